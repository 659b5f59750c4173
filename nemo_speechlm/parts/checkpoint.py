"""What a ``.nemo`` file is, checked before NeMo restores it.

NeMo's own restore fails on a bad file with whatever the failing layer says
(``tarfile.ReadError: unexpected end of data``), and quietly builds *another* NeMo model
from a ``.nemo`` that is not ours. :func:`read_nemo_config` looks inside first and says
which case it is: not a tar, truncated, not a NeMo model, another toolkit's model, or one
written by a newer, incompatible version of this package. ``save_to`` stamps the format
(:func:`stamp_checkpoint_format`) so that the last case can be told apart.

A training checkpoint (``.ckpt``) that a rerun would resume from is checked against the model first
(:func:`check_resume_fits`): a rerun with another architecture (a wider adapter, another LLM) used to
die in Lightning's ``load_state_dict`` with a traceback of size mismatches.
"""
from __future__ import annotations

import re
import tarfile
import zipfile
from pathlib import Path
from typing import TypeVar

import torch
from nemo.core.classes.common import UnsafeTargetError
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import nemo_speechlm  # its __version__ is read at call time (this module loads while the package initialises)
from nemo_speechlm.errors import ConfigError, InputError
from nemo_speechlm.parts.runner import changed_values

# Bump when a .nemo written by this code can no longer be restored by older code.
CHECKPOINT_FORMAT = 1
CONFIG_NAME = "model_config.yaml"
OUR_PREFIX = "nemo_speechlm."
_OURS_FIX = "give a .nemo written by nemo_speechlm training (output_nemo, or <log dir>/<name>.nemo)"

Model = TypeVar("Model")
_NOT_ARCHITECTURE = ("model.optimizer.", "model.lr_scheduler.", "model.llm_files", "model.nemo_version", "model.target")


class CheckpointError(InputError):
    """A ``.nemo`` file this package cannot restore; the message names the file and says why."""

    def __init__(self, path: str | Path, problem: str, fix: str | None = None) -> None:
        super().__init__(f"{path}: {problem}", fix)
        self.path = str(path)


def check_resume_fits(model, ckpt_path: str | Path) -> None:
    """Raise :class:`~nemo_speechlm.errors.ConfigError` naming the changed ``model.*`` settings when the
    weights in ``ckpt_path`` (the checkpoint this run would resume from) do not fit ``model``."""
    ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    saved = {k: tuple(v.shape) for k, v in ckpt.get("state_dict", {}).items() if torch.is_tensor(v)}
    # Parameters must match in shape; buffers may not (the CTC read-out's vocabulary is sized when it loads),
    # but a saved entry the model has no place for is a misfit too.
    params = {k: tuple(v.shape) for k, v in model.named_parameters()}
    misfits = sorted({k for k in params if saved.get(k) != params[k]} | (saved.keys() - model.state_dict().keys()))
    if not misfits:
        return
    before = (ckpt.get("hyper_parameters") or {}).get("cfg")
    changed = changed_values(OmegaConf.to_container(before, resolve=True), OmegaConf.to_container(model.cfg, resolve=True),
                             prefix="model.") if before is not None else []
    # what shapes the weights: not the optimizer, nor what saving and building write into the config
    changed = [c for c in changed if None not in c[1:] and not c[0].startswith(_NOT_ARCHITECTURE)]
    what = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed[:8]) or f"e.g. {misfits[0]}"
    run_dir = Path(ckpt_path).parent.parent
    raise ConfigError(
        f"{ckpt_path}: this run would resume from a checkpoint of another model ({len(misfits)} weights do not "
        f"fit; changed settings: {what})",
        f"give the run another name= or exp_manager.exp_dir, or delete {run_dir} to start over",
    )


def checkpoint_step(ckpt_path: str | Path) -> int | None:
    """The optimizer step a Lightning checkpoint was saved at (``None`` for one this cannot read, e.g. a folder)."""
    try:
        return int(torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 -- any unreadable checkpoint: the caller then writes its output anew
        return None


def stamp_checkpoint_format(cfg: DictConfig) -> None:
    """Record the checkpoint format and package version in a model config about to be saved."""
    cfg.checkpoint_format = CHECKPOINT_FORMAT
    cfg.nemo_speechlm_version = nemo_speechlm.__version__


def read_nemo_config(path: str | Path) -> DictConfig:
    """The model config inside a ``.nemo`` that this version of nemo_speechlm can restore;
    raises :class:`CheckpointError` saying what the file is otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model file not found: {path}")
    if not tarfile.is_tarfile(path):
        # (tested second: the weights inside a .nemo are a zip, which is_zipfile finds from the end)
        kind = "a zip archive (a PyTorch or Lightning .ckpt/.pt?)" if zipfile.is_zipfile(path) else "not a tar archive"
        raise CheckpointError(path, f"not a .nemo file ({kind})", _OURS_FIX)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}  # reads every header: finds truncation
            if CONFIG_NAME not in members:
                raise CheckpointError(path, f"not a NeMo model file (a tar archive without {CONFIG_NAME})", _OURS_FIX)
            text = tar.extractfile(members[CONFIG_NAME]).read().decode("utf-8")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CheckpointError(path, f"the .nemo file is truncated or damaged ({e})",
                              "copy or export it again (an interrupted copy or save leaves a truncated file)") from e
    try:
        cfg = OmegaConf.create(text)
    except (OmegaConfBaseException, ValueError) as e:  # YAML errors are ValueErrors
        raise CheckpointError(path, f"its {CONFIG_NAME} is not a valid config ({e})", _OURS_FIX) from e
    _check_ours(path, cfg)
    return cfg


def restore_checked(model_cls: type[Model], path: str | Path, map_location=None) -> Model:
    """``model_cls.restore_from(path)`` after :func:`read_nemo_config`; NeMo's refusal of a class the
    config names (its target allow-list), and any other :class:`~nemo_speechlm.errors.InputError` while restoring
    (a trainable-only file whose references load other weights now), become a :class:`CheckpointError` naming the file."""
    read_nemo_config(path)
    try:
        return model_cls.restore_from(str(path), map_location=map_location)
    except UnsafeTargetError as e:
        named = re.search(r"target '([^']*)'", str(e))
        what = repr(named.group(1)) if named else "a class"
        raise CheckpointError(path, f"its config names {what}, which NeMo refuses to build (not in its allowed targets)",
                              "only load .nemo files from sources you trust") from e
    except CheckpointError:
        raise
    except InputError as e:  # e.g. a trainable-only file whose references now load other weights: name the file
        raise CheckpointError(path, str(e), e.fix) from e


def _check_ours(path: Path, cfg: DictConfig) -> None:
    target = cfg.get("target") if isinstance(cfg, DictConfig) else None
    if not isinstance(target, str) or not target:
        raise CheckpointError(path, "not a nemo_speechlm model (its config names no model class)", _OURS_FIX)
    if not target.startswith(OUR_PREFIX):
        kind = f"a NeMo model ({target})" if target.startswith("nemo.") else f"a model of class {target!r}"
        raise CheckpointError(path, f"is {kind}, not a nemo_speechlm speech LLM", _OURS_FIX)
    written = cfg.get("checkpoint_format", 1)
    if not isinstance(written, int) or written > CHECKPOINT_FORMAT:
        by = cfg.get("nemo_speechlm_version", "an unknown version")
        raise CheckpointError(
            path,
            f"written by nemo_speechlm {by} in checkpoint format {written!r}; this install "
            f"(nemo_speechlm {nemo_speechlm.__version__}) reads formats up to {CHECKPOINT_FORMAT}",
            "upgrade nemo_speechlm to the version that wrote the file (pip install -U nemo_speechlm)",
        )
