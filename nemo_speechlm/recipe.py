"""The training recipe every example script runs: trainer + exp_manager + model + data -> fit -> ``.nemo``."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager
from nemo.utils.trainer_utils import resolve_trainer_cfg
from omegaconf import DictConfig, OmegaConf

from nemo_speechlm.data.datamodule import build_datamodule, fill_model_settings, record_system_prompt
from nemo_speechlm.data.conversations import cut_for_audio
from nemo_speechlm.data.feature_cache import fill_feature_cache, open_feature_cache, transcribed_utterances, utterances_in
from nemo_speechlm.data.manifest import read_manifest
from nemo_speechlm.data.preflight import ClipRange, check_clip_lengths, check_pre_alignment_data, check_training_data
from nemo_speechlm.errors import ConfigError, InputError
from nemo_speechlm.parts.checkpoint import check_resume_fits, checkpoint_step
from nemo_speechlm.parts.connector_ctc import (ALIGNED_CONNECTOR_PREFIXES, freeze_aligned_connector, load_aligned_connector,
                                               pretrain_connector_ctc)
from nemo_speechlm.parts.distributed import (broadcast_from_rank0, resolve_strategy, start_ranks,
                                             stop_started_ranks_on_failure)
from nemo_speechlm.parts.fsdp import full_state_dict
from nemo_speechlm.parts.precision import resolve_precision_plugins, warn_if_trained_weights_in_half_precision
from nemo_speechlm.parts.runner import read_json_object, write_json_atomic

# What the final .nemo holds: every weight (save_to), or all but the frozen base weights that the references
# (model.pretrained_llm, the encoder's checkpoint) load again (save_trainable_to; models/reference_weights.py).
OUTPUT_SCOPES = ("full", "trainable")


def train(cfg: DictConfig, model_cls) -> Path:
    """Train ``model_cls(cfg.model)`` on ``cfg.data``; returns the path of the written ``.nemo``.

    Runs on CPU (``trainer.accelerator=cpu``) as well as on GPUs; no process group is
    created by hand (Lightning's strategy does that when there are several devices).
    Rerunning with the same ``exp_manager`` directory resumes from the last checkpoint.
    The data is read and checked before any model is built (``nemo_speechlm.data.preflight``).
    """
    logging.info(f"Config:\n{OmegaConf.to_yaml(cfg)}")
    scope = cfg.get("output_scope") or "full"
    if scope not in OUTPUT_SCOPES:
        raise ConfigError(f"config: output_scope is {scope!r}, not one of {', '.join(OUTPUT_SCOPES)}",
                          "output_scope=full (every weight) or output_scope=trainable (without the frozen base weights)")
    clips = check_training_data(cfg)
    # Data configs are copied around by NeMo's loaders and lose their root: resolve
    # interpolations such as ${model.audio_locator_tag} now.
    OmegaConf.resolve(cfg.data)
    record_system_prompt(cfg)  # carried into the .nemo: inference answers under it by default
    torch.manual_seed(cfg.get("seed", 0))
    # bf16-true/fp16-true: NeMo's fp32-audio plugin, extended to keep the mel front end in fp32.
    trainer_cfg = resolve_trainer_cfg(cfg.trainer)
    _check_integer_trainer_settings(trainer_cfg)  # (resolve_strategy reads num_nodes as an integer)
    trainer_cfg = resolve_strategy(resolve_precision_plugins(trainer_cfg, cfg.get("frozen_weights_dtype")))
    if cfg.data.get("validation_ds") is None:
        trainer_cfg["limit_val_batches"] = 0  # Lightning rejects a missing val dataloader otherwise
    try:
        trainer = Trainer(**trainer_cfg)
    except (MisconfigurationException, ValueError, TypeError) as exc:  # settings this machine cannot run, or unknown
        # ones (Lightning raises ValueError for an unknown precision or strategy name, TypeError for an unknown key)
        raise ConfigError(f"trainer: {exc}", "set trainer.accelerator / trainer.devices / trainer.strategy / "
                          "trainer.precision to values Lightning knows and this machine has (e.g. trainer.accelerator=cpu)"
                          ) from exc
    log_dir = exp_manager(trainer, cfg.get("exp_manager"))
    if not trainer.ckpt_path:  # a resumed run skips the stage, and its manifest may be gone
        check_pre_alignment_data(cfg)
    with stop_started_ranks_on_failure(trainer):
        start_ranks(trainer)  # several devices: the other ranks and the process group now, so pre-fit work is shared
        return _fit_and_save(cfg, model_cls, trainer, log_dir, clips, scope)


def _fit_and_save(cfg: DictConfig, model_cls, trainer: Trainer, log_dir: Path, clips: ClipRange, scope: str) -> Path:
    """Everything from building the model on: pre-fit work (feature cache, connector pre-alignment), ``fit``, the
    ``.nemo``; on every rank."""
    model = model_cls(cfg.model, trainer=trainer)
    if trainer.ckpt_path:
        check_resume_fits(model, trainer.ckpt_path)
    check_clip_lengths(clips, model)
    warn_if_trained_weights_in_half_precision(trainer.precision, model)
    fill_model_settings(cfg.data, model)
    if _encodes_before_fit(cfg):
        model.move_speech_side(trainer.strategy.root_device)  # feature cache / pre-alignment on this rank's accelerator
    feature_cache = open_feature_cache(cfg.get("feature_cache"), model, trainer.precision)
    # The pre-alignment encodes its manifest first, in manifest order: an utterance's cached features (to
    # rounding, the batch it was encoded in) then do not depend on which utterances the training data asks for.
    # Filled the other way round, a new task in the catalog changed the behaviors' utterances, their features
    # by up to 1.1e-4, and with them stage 1's whole trajectory.
    pre_align_connector(cfg.get("connector_pretraining"), model, cfg.data, feature_cache, resuming=bool(trainer.ckpt_path))
    if feature_cache is not None:
        fill_feature_cache(model, feature_cache, utterances_in(cfg.data))
    datamodule = build_datamodule(cfg.data, model, feature_cache)
    trainer.fit(model, datamodule)
    nemo_path = Path(cfg.get("output_nemo") or Path(log_dir) / f"{cfg.get('name', 'speechlm')}.nemo")
    checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)  # (NeMo moves the log dir's files on resume)
    record = Path(checkpoints) / OUTPUT_RECORD if checkpoints else None
    if trainer.strategy.broadcast(trainer.is_global_zero and _written_by_this_run(trainer, cfg, nemo_path, record), src=0):
        logging.info(f"Kept {nemo_path}: this run had finished (step {trainer.global_step}) and wrote it")
        return nemo_path
    with full_state_dict(model):  # FSDP2: every rank takes part in gathering the weights
        if trainer.is_global_zero:
            if scope == "trainable":  # without the frozen base weights the references load again
                model.save_trainable_to(str(nemo_path))
            else:
                model.save_to(str(nemo_path))
            if record is not None:
                write_json_atomic(record, _output_identity(trainer, cfg, nemo_path))
            logging.info(f"Saved {nemo_path} ({scope} weights)")
    return nemo_path


# Among the run's checkpoints: which .nemo the run wrote, at which step, from which config.
OUTPUT_RECORD = "output_nemo.json"


def _output_identity(trainer: Trainer, cfg: DictConfig, nemo_path: Path) -> dict:
    stat = nemo_path.stat()
    return {"path": str(nemo_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "step": trainer.global_step, "config": hashlib.sha256(OmegaConf.to_yaml(cfg).encode()).hexdigest()}


def _written_by_this_run(trainer: Trainer, cfg: DictConfig, nemo_path: Path, record: Path | None) -> bool:
    """A rerun of a finished command: it resumed at the step it stopped at, trained nothing, and ``nemo_path`` is
    the file this run wrote from this config at that step, untouched since (``record``). Written again, the same
    weights had a new modification time, by which evaluations and the benchmark tell models apart: a
    ``train && evaluate`` job killed while evaluating refused to resume its evaluation when rerun as it was."""
    ckpt = trainer.ckpt_path
    try:
        if not ckpt or record is None or not nemo_path.is_file() or checkpoint_step(ckpt) != trainer.global_step:
            return False
        return read_json_object(record, "record of the written .nemo") == _output_identity(trainer, cfg, nemo_path)
    except InputError:  # an unreadable record: the file is written anew
        return False


# Trainer settings Lightning takes as integers: a string there failed inside Lightning with "'<' not supported
# between instances of 'str' and 'int'", naming no setting.
_INTEGER_TRAINER_SETTINGS = ("max_steps", "min_steps", "max_epochs", "min_epochs", "accumulate_grad_batches",
                             "log_every_n_steps", "num_nodes", "num_sanity_val_steps", "check_val_every_n_epoch")


def _check_integer_trainer_settings(trainer_cfg: dict) -> None:
    for key in _INTEGER_TRAINER_SETTINGS:
        value = trainer_cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"trainer: {key} is {value!r}, not an integer", f"set trainer.{key} to a whole number")


def _encodes_before_fit(cfg: DictConfig) -> bool:
    return bool((cfg.get("feature_cache") or {}).get("dir") or (cfg.get("connector_pretraining") or {}).get("steps"))


def pre_align_connector(pre_cfg: DictConfig | None, model, data_cfg: DictConfig, feature_cache, resuming: bool) -> None:
    """``connector_pretraining.steps`` CTC steps on the connector alone before ``fit``
    (see ``nemo_speechlm.parts.connector_ctc``); skipped when resuming (the checkpoint has the connector).
    With ``freeze_connector`` the aligned connector is then frozen, on resume too, so the optimizer
    state in the checkpoint matches the parameters that train.
    ``connector_pretraining.init_from``: a connector saved by ``parts.connector_ctc.save_aligned_connector``
    is loaded instead of running the CTC steps (``examples/compare_objectives.py`` aligns once per seed)."""
    if not pre_cfg or not (pre_cfg.get("steps") or pre_cfg.get("init_from")):
        return
    if resuming:
        logging.info("Connector pre-alignment skipped: resuming from a checkpoint")
    elif pre_cfg.get("init_from"):
        load_aligned_connector(model, pre_cfg.init_from)
    else:
        _run_pre_alignment(pre_cfg, model, data_cfg, feature_cache)
        broadcast_from_rank0(v for k, v in model.state_dict().items() if k.startswith(ALIGNED_CONNECTOR_PREFIXES))
    if pre_cfg.get("freeze_connector"):
        freeze_aligned_connector(model)


def _run_pre_alignment(pre_cfg: DictConfig, model, data_cfg: DictConfig, feature_cache) -> None:
    manifest = pre_cfg.get("manifest_filepath")
    if manifest:
        utterances = [(cut_for_audio(e["audio_filepath"], float(e.get("offset") or 0.0), e.get("duration")), e["text"])
                      for e in read_manifest(manifest)]
    else:
        utterances = transcribed_utterances(data_cfg)
    if feature_cache is not None:
        fill_feature_cache(model, feature_cache, [cut for cut, _ in utterances])
    pretrain_connector_ctc(model, utterances, pre_cfg.steps, lr=pre_cfg.get("lr", 2e-3),
                           batch_size=pre_cfg.get("batch_size", 16), feature_cache=feature_cache,
                           seed=pre_cfg.get("seed", 0))
