"""What a trainable-only ``.nemo`` leaves out, and the check that what is loaded in its place is the same.

``save_trainable_to`` writes a small ``.nemo`` that gets its base weights back from references: the LLM
from ``pretrained_llm``, the encoder from ``pretrained_asr`` or its own checkpoint (Whisper's
``pretrained_model``). Two things went wrong when it dropped every frozen weight instead:

* weights frozen *after* training them (the connector, frozen by ``connector_pretraining.freeze_connector``
  after stage 1: MTBI's default) were left out, and the file could not be restored
  ("missing trainable weights");
* weights no reference can give back (a frozen encoder built from config alone) were left out, and the
  restored model silently had another random encoder.

So only the reference parts' frozen weights are left out (:func:`reference_weight_names`), and the file
records a fingerprint of them per reference (:func:`reference_fingerprints`); restoring recomputes it on
what the references loaded (:func:`check_reference_weights`) and refuses other weights (a base LLM
replaced in place, ``pretrained_llm`` pointed elsewhere) instead of running the trained adapters on them.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from omegaconf import DictConfig

from nemo_speechlm.errors import InputError

# Elements read per tensor: another checkpoint (a different fine-tune, seed or model) differs nearly
# everywhere, so a strided sample tells it apart at a fraction of hashing every byte of a 7B model.
_SAMPLES_PER_TENSOR = 4096


def reference_sources(cfg: DictConfig) -> dict[str, str]:
    """The parts whose base weights a reference can load again, and the reference: ``llm`` always;
    ``encoder`` when it comes from ``pretrained_asr`` or its own checkpoint."""
    sources = {"llm": str(cfg.pretrained_llm)}
    encoder = cfg.perception.get("encoder") or {}
    if cfg.get("pretrained_asr"):
        sources["encoder"] = str(cfg.pretrained_asr)
    elif "load_pretrained_weights" in encoder:
        sources["encoder"] = str(encoder.get("pretrained_model"))
    return sources


def _part_of(name: str, parts: Iterable[str]) -> str | None:
    if "lora_" in name:  # LoRA is trained on top of a reference, never loaded from it
        return None
    if "llm" in parts and name.startswith("llm."):
        return "llm"
    if "encoder" in parts and name.startswith(("perception.encoder.", "perception.preprocessor.")):
        return "encoder"
    return None


def _named_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every name a parameter has in the state dict, tied ones included: an LLM whose output layer shares the
    embedding matrix (SmolLM2, Llama 3.2, Gemma) lists ``lm_head.weight`` only here, and a file that left out
    just the first name kept the whole matrix (113 of the demo model's 126 MB)."""
    return dict(model.named_parameters(remove_duplicate=False))


def _weight_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights by name, read from the state dict rather than the parameters: under FSDP2 a parameter is
    this rank's shard, and the state dict is the gathered whole while ``parts.fsdp.full_state_dict`` is open."""
    return model.state_dict()


def reference_weight_names(model: torch.nn.Module, frozen_only: bool = True) -> dict[str, list[str]]:
    """Per reference part of ``model`` (its ``cfg`` says which), the parameters it loads: the frozen ones (what a
    trainable-only file leaves out) or, with ``frozen_only=False``, all of them (what a restore may find missing)."""
    parts = reference_sources(model.cfg)
    names: dict[str, list[str]] = {part: [] for part in parts}
    for name, param in _named_weights(model).items():
        part = _part_of(name, parts)
        if part is not None and not (frozen_only and param.requires_grad):
            names[part].append(name)
    return names


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of named weights: names, shapes and a strided sample of each tensor's values, read in bf16
    so that the same weights in fp32 or bf16 (a bf16-true run's model, its fp32 references) agree. What it
    cannot see: changes confined to unsampled values, or below bf16's precision (~0.4%) in every sampled one."""
    digest = hashlib.blake2b(digest_size=8)
    with torch.no_grad():
        for name in sorted(tensors):
            flat = tensors[name].detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)].to(torch.bfloat16).float().cpu()
            digest.update(f"{name}{tuple(tensors[name].shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def reference_fingerprints(model: torch.nn.Module, names: dict[str, list[str]]) -> dict[str, str]:
    """What a trainable-only file records: each reference part's fingerprint over the weights it leaves out."""
    weights = _weight_values(model)
    return {part: fingerprint({n: weights[n] for n in part_names}) for part, part_names in names.items() if part_names}


def check_reference_weights(model: torch.nn.Module, missing: Iterable[str]) -> None:
    """Raise :class:`~nemo_speechlm.errors.InputError` when a reference loaded other weights for ``missing`` (the
    names the file left out) than those the file was saved with (``cfg.reference_fingerprints``; files written
    before it are not checked)."""
    recorded = model.cfg.get("reference_fingerprints") or {}
    sources = reference_sources(model.cfg)
    weights = _weight_values(model)
    by_part: dict[str | None, dict[str, torch.Tensor]] = {}
    for name in missing:
        by_part.setdefault(_part_of(name, sources), {})[name] = weights[name]
    for part, expected in recorded.items():
        found = fingerprint(by_part.get(part, {}))
        if found != expected:
            setting = ("model.pretrained_llm" if part == "llm" else "the encoder's reference (model.pretrained_asr)"
                       if model.cfg.get("pretrained_asr") else "the encoder's checkpoint (model.perception.encoder.pretrained_model)")
            raise InputError(
                f"this trainable-only model was trained on other {part} weights than {sources.get(part)!r} gives now "
                f"(fingerprint {found}, saved with {expected}): its adapters would run on another base model",
                f"point {setting} at the weights it was trained with, or restore a full .nemo (save_to)",
            )
