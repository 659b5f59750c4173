"""Several processes before ``trainer.fit``: work done once before training (the frozen-encoder
feature cache) is shared out across ranks, on each rank's own device, then a barrier.

Lightning creates the other processes and the process group inside ``fit``. With ``strategy=ddp``
and no external launcher (no ``torchrun``/SLURM), rank 0 re-runs the training command for
ranks 1..N-1 at that moment. :func:`start_ranks` does both now instead, right after ``exp_manager``
(so the children inherit its log-directory version, as they would at ``fit``); ``fit`` then finds
``LOCAL_RANK`` set and the process group initialised and does neither again. Under ``torchrun`` or
SLURM every rank already runs the script from the start: only the process group is created early.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _launch_process_observer
from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from nemo.utils import logging

from nemo_speechlm.parts.fsdp import FSDP2_STRATEGY_NAME, fsdp2_strategy


def start_ranks(trainer: Trainer) -> None:
    """Start the other ranks and the process group now rather than in ``fit`` (no-op on one device).

    Only strategies with a process group (``ddp``, ``fsdp``, ...) and the script launcher are
    started early; ``ddp_spawn`` and ``ddp_notebook`` start theirs inside ``fit`` only, and the
    pre-fit work then runs in each process unshared, as before.
    """
    if trainer.world_size <= 1:
        return
    strategy = trainer.strategy
    launcher = getattr(strategy, "_launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or not hasattr(strategy, "setup_distributed"):
        logging.info(f"{type(strategy).__name__} starts its processes inside fit: pre-fit work is not shared across ranks")
        return
    if not launcher.cluster_environment.creates_processes_externally:
        launcher._call_children_scripts()  # what launcher.launch() does in fit; sets LOCAL_RANK=0 here
        _launch_process_observer(launcher.procs)
    strategy.setup_environment()  # this rank's device + init_process_group; fit skips an initialised group
    logging.info(f"Rank {dist.get_rank()} of {dist.get_world_size()} started before fit on {strategy.root_device}")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device_for_prefit_work(trainer: Trainer) -> torch.device:
    """The device this rank trains on (its GPU, or the CPU): pre-fit encoding runs there."""
    return trainer.strategy.root_device


def _device_count(devices) -> int | None:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    return devices if isinstance(devices, int) and devices > 0 else None  # "auto" / -1: unknown before launch


def resolve_strategy(trainer_cfg: dict) -> dict:
    """The configs name a DDP strategy for several devices (``ddp_find_unused_parameters_true``: a joint SFT
    text-only batch leaves the speech side without gradient). On one device (``devices * num_nodes == 1``)
    Lightning would still wrap the model in DDP with a process group of one; use ``auto`` (no wrapper) then.
    ``fsdp2`` (our name; Lightning has no string for it) becomes FSDP2 over all devices (``parts/fsdp.py``)."""
    strategy = trainer_cfg.get("strategy")
    count = _device_count(trainer_cfg.get("devices", 1))
    if strategy == FSDP2_STRATEGY_NAME:
        trainer_cfg["strategy"] = fsdp2_strategy(None if count is None else count * int(trainer_cfg.get("num_nodes") or 1))
        return trainer_cfg
    if isinstance(strategy, str) and strategy.startswith("ddp") and count is not None and count * int(trainer_cfg.get("num_nodes") or 1) == 1:
        trainer_cfg["strategy"] = "auto"
    return trainer_cfg
