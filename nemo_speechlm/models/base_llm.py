"""The base LLM: a speech LLM's LLM as it was before speech training, in one place.

With LoRA, the adapters are switched off. Without LoRA, a frozen LLM is its own base; an LLM
fine-tuned without LoRA is reloaded from ``pretrained_llm`` (:func:`base_llm`). MTBI's KL teacher,
the benchmark's text upper bound and the text-retention evaluation all use :func:`base_llm`, so they
compare with the same LLM.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

FROZEN_LLM_NOTE = (
    "The model has no LoRA adapters and its LLM was frozen during training, so the trained model and the base LLM "
    "are the same network on text-only prompts: agreement is expected to be perfect (1.0) unless something the "
    "adapter changed leaks into text-only answers."
)


@contextlib.contextmanager
def base_llm(model) -> Iterator[None]:
    """Run the model's LLM as it was before speech training (the KL teacher, the forgetting check).

    LoRA adapters are switched off (peft's ``disable_adapter``). Without LoRA, a frozen LLM is
    its own base; an LLM fine-tuned without LoRA is reloaded from ``pretrained_llm``. It runs as at
    inference (dropout off) also inside a training step, where a LoRA model's LLM is in training mode:
    the KL teacher is a fixed target, not a noisy one.
    """
    if hasattr(model.llm, "disable_adapter"):
        with model.llm.disable_adapter(), _eval_mode(model.llm):
            yield
        return
    if not _llm_was_trained(model):
        with _eval_mode(model.llm):
            yield
        return
    trained = model.llm
    model.llm = _load_base_llm(model)
    try:
        yield
    finally:
        model.llm = trained


def base_llm_description(model) -> str:
    """What :func:`base_llm` compares with, in words for the metrics file."""
    if hasattr(model.llm, "disable_adapter"):
        return "the same model with its LoRA adapters disabled"
    if not _llm_was_trained(model):
        return FROZEN_LLM_NOTE
    return f"the LLM reloaded from pretrained_llm={model.cfg.pretrained_llm} (the LLM was fine-tuned without LoRA)"


def base_llm_identity(model) -> str:
    """What the base LLM answers with, as a string: ``pretrained_llm`` and a digest of the base LLM's weights
    (LoRA's left out, peft's name prefixes stripped), its dtype, generation config and prompt format.

    Two speech models on the same LLM share it whatever their adapters or LoRA: the benchmark keys its cached
    text-LLM references by it, so a retrained model, or another model on the same LLM, reuses them."""
    digest = hashlib.blake2b(digest_size=8)
    with base_llm(model), torch.no_grad():
        weights = {_plain_llm_name(name): tensor for name, tensor in model.llm.state_dict().items() if "lora_" not in name}
        for name in sorted(weights):
            tensor = weights[name]
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        digest.update(model.llm.generation_config.to_json_string().encode())
    digest.update(repr(model.cfg.get("prompt_format")).encode())
    return f"{model.cfg.pretrained_llm} (base LLM {digest.hexdigest()})"


def _plain_llm_name(name: str) -> str:
    """A peft-wrapped LLM's weight name as the plain LLM's (``base_model.model.`` and ``.base_layer`` dropped)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the duration, then each submodule back in its own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _llm_was_trained(model) -> bool:
    return any(p.requires_grad for p in model.llm.parameters())


def _load_base_llm(model) -> torch.nn.Module:
    from nemo_speechlm.parts.llm import load_llm, resolve_llm_source

    if getattr(model, "_base_llm_cache", None) is None:
        source = model.cfg.pretrained_llm
        try:
            llm = load_llm(resolve_llm_source(source))
        except Exception as e:
            raise RuntimeError(f"The LLM was fine-tuned without LoRA, so the base LLM must be loaded from "
                               f"pretrained_llm={source!r}, which failed: {e}") from e
        dtype = next(model.llm.parameters()).dtype
        object.__setattr__(model, "_base_llm_cache", llm.to(model.device, dtype).eval())  # not a registered submodule
    return model._base_llm_cache
