"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for LLMs that do not fit one device, following SALM.

``trainer.strategy=fsdp2`` selects Lightning's ``ModelParallelStrategy`` with every device in the
data-parallel dimension (:func:`fsdp2_strategy`); Lightning then calls the model's
``configure_model``, which calls :func:`shard_model`: each LLM decoder layer, the input embeddings,
the output head, the LLM, the speech encoder, the connector and the CTC read-out become FSDP2 units,
as in SALM's ``configure_model``. The embeddings get their own unit because the model embeds the
prompt text outside the LLM's forward (speech is spliced in between), and the CTC read-out reads
them through that unit's forward (``modules/ctc_readout.py``).

Not supported, with a clear error: tensor parallelism (SALM's TP plan is Llama-specific) and LLMs with
tied input/output embeddings (one parameter cannot live in two units; such LLMs are small enough
for DDP). At the end of training :func:`full_state_dict` gathers the weights so rank 0 writes an
ordinary ``.nemo``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from nemo.utils import logging
from torch.distributed.tensor import DTensor

from nemo_speechlm.errors import ConfigError

FSDP2_STRATEGY_NAME = "fsdp2"


def fsdp2_strategy(world_size: int | None):
    """Lightning's ``ModelParallelStrategy`` with all ``world_size`` devices data parallel (FSDP2, no tensor
    parallelism). Checkpoints during training are gathered into one file (``save_distributed_checkpoint=False``),
    so resuming and NeMo's checkpoint callbacks see the usual ``.ckpt``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if world_size is None:
        raise ConfigError("trainer.strategy=fsdp2 needs the number of devices: set trainer.devices to an integer.")
    return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=False)


def shard_model(model, device_mesh) -> None:
    """Apply FSDP2 to ``model`` (a ``SpeechLMModel``) over ``device_mesh``'s data-parallel dimension."""
    from peft import PeftModel
    from torch.distributed.fsdp import fully_shard

    if device_mesh["tensor_parallel"].size() > 1:
        raise ConfigError("Tensor parallelism is not supported: use trainer.strategy=fsdp2 (data parallel only).")
    mesh = device_mesh["data_parallel"]
    if mesh.size() == 1:
        return
    llm = model.llm.base_model.model if isinstance(model.llm, PeftModel) else model.llm
    embeddings, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if head is not None and head.weight is embeddings.weight:
        raise ConfigError("FSDP2 here needs an LLM with untied input/output embeddings (tie_word_embeddings=false): "
                          "a tied weight cannot be sharded in two units. LLMs with tied embeddings are small; train "
                          "them with DDP (the default strategy).")
    layers = _decoder_layers(llm)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(embeddings, mesh=mesh)
    if head is not None:
        fully_shard(head, mesh=mesh)
    fully_shard(model.llm, mesh=mesh)
    # The model runs the perception's parts one by one (encoder alone, to cache and slice its output; then
    # the adapter and projection), never perception.forward: each part with weights is its own unit.
    for part in model.perception.children():
        if any(True for _ in part.parameters()):
            fully_shard(part, mesh=mesh)
    if model.ctc_readout is not None:  # reads the embeddings through their unit's forward (modules/ctc_readout.py)
        fully_shard(model.ctc_readout, mesh=mesh)
    left_out = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if left_out:
        raise ConfigError(f"FSDP2: parameters outside every sharded unit would not be synchronised: {left_out[:5]}")
    # FSDP2 sets up a tree of units lazily, at the first forward of its root (the LLM). The prompt is embedded
    # before the LLM runs, and the embedding unit would then make itself a root; one token through the LLM
    # first makes the tree right. (SALM avoids this by moving the embeddings out of the LLM.)
    with torch.no_grad():
        model.llm(input_ids=torch.zeros(1, 1, dtype=torch.long, device=embeddings.weight.device))
    logging.info(f"FSDP2: {len(layers)} LLM layers, embeddings, head, LLM and speech parts sharded over {mesh.size()} ranks")


def _decoder_layers(llm) -> torch.nn.ModuleList:
    layers = getattr(getattr(llm, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"FSDP2: cannot find the decoder layers of {type(llm).__name__} at `.model.layers` "
                          "(the Llama/Qwen/Mistral layout of Hugging Face causal LMs).")
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def full_state_dict(model) -> Iterator[None]:
    """While open, ``model.state_dict()`` on rank 0 returns the full (gathered, CPU) weights, so ``save_to``
    writes an ordinary ``.nemo``. Every rank must enter it (the gather is collective). No-op when unsharded."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model._gathered_state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    try:
        yield
    finally:
        model._gathered_state_dict = None
