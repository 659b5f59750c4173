"""A resumed run trains with its own optimizer and learning-rate settings, from the checkpoint's step.

Lightning restores the optimizer's and the scheduler's whole state from the checkpoint, settings
included. So rerunning a command with a longer ``trainer.max_steps`` (to train on) or another
``model.optimizer.lr`` silently kept the old ones: measured on CPU, a 2-step run resumed with
``max_steps=4`` and ten times the lr trained its two new steps at the old schedule's ``min_lr``
(1e-6), because the cosine schedule was past its old end (a known NeMo trap, NVIDIA/NeMo#4472).

:func:`apply_configured_schedule` keeps what the checkpoint is for (the optimizer's moments, the
step count) and takes every setting from this run's config: the optimizer's hyperparameters
(``lr``, ``betas``, ``weight_decay``, ...) and the scheduler's (``max_steps``, ``warmup_steps``,
``min_lr``, ...), then sets the learning rate the schedule gives at the checkpoint's step. With the
same config nothing changes (the learning rate is recomputed for the same step).
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from nemo.core.classes.common import safe_instantiate

# Scheduler state that is progress, not settings: kept from the checkpoint.
_PROGRESS = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial")


def apply_configured_schedule(optimizer: torch.optim.Optimizer, scheduler, optimizer_cfg: DictConfig,
                              scheduler_cfg: DictConfig | None) -> list[str]:
    """Give the restored ``optimizer`` / ``scheduler`` the settings of these configs (as
    ``configure_optimizers`` builds them); returns ``"name: old -> new"`` for each setting that changed."""
    probe = safe_instantiate(optimizer_cfg, [torch.zeros(1, requires_grad=True)], _convert_="all")
    changed = []
    for group in optimizer.param_groups:
        for key, value in probe.defaults.items():
            if key not in group:
                continue
            if key != "lr" and _plain(group[key]) != _plain(value):  # lr moves with the schedule: see initial_lr
                changed.append(f"model.optimizer.{key}: {group[key]} -> {value}")
            group[key] = value
        if "initial_lr" in group:
            if group["initial_lr"] != probe.defaults["lr"]:
                changed.append(f"model.optimizer.lr: {group['initial_lr']} -> {probe.defaults['lr']}")
            group["initial_lr"] = probe.defaults["lr"]
    if scheduler is None or scheduler_cfg is None:
        return sorted(set(changed))
    fresh = safe_instantiate(scheduler_cfg, probe).state_dict()
    restored = scheduler.state_dict()
    for key, value in fresh.items():
        if key not in _PROGRESS and key != "base_lrs" and key in restored and _plain(restored[key]) != _plain(value):
            changed.append(f"model.lr_scheduler.{key}: {restored[key]} -> {value}")
    state = {**fresh, **{k: restored[k] for k in _PROGRESS if k in restored}}
    state["base_lrs"] = [group["initial_lr"] for group in optimizer.param_groups]
    # One step back, then step(): the scheduler sets each group's lr for the checkpoint's step, as it would have.
    state["last_epoch"] -= 1
    state["_step_count"] = max(state.get("_step_count", 1) - 1, 1)
    scheduler.load_state_dict(state)
    scheduler.step()
    return sorted(set(changed))


def _plain(value):
    """Tuples as lists, so ``betas=(0.9, 0.98)`` from a restored group equals ``[0.9, 0.98]`` from a config."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
