"""Sequence packing for a training step: a padded batch's sequences laid end to end in fewer rows.

The LLM computes every position of a row, padding included; on the demo's MTBI batches (8 examples,
not bucketed) 25.7% of the positions are padding, 4.6% once packed (docs/throughput.md). Packing puts
the same sequences into rows at most about twice as long as the longest, so the step sees exactly the
same examples and targets but computes fewer positions. Bucketing cuts padding too, but changes which
examples share a step.

The math is unchanged: each packed sequence's positions restart at 0, from which ``transformers``
builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``, used when the
attention mask is ``None``), so a sequence attends only to itself; rotary embeddings depend on
relative positions only, so a sequence that started after left padding scores the same. Not every
LLM does this (OPT's learned positions and its mask follow the attention mask, not ``position_ids``), so
:func:`check_llm_keeps_packed_sequences_apart` tries it once on the LLM in hand before packing trusts it.
"""
from __future__ import annotations

import heapq
import math

import torch

from nemo_speechlm.errors import ConfigError

__all__ = ["check_llm_keeps_packed_sequences_apart", "pack_rows"]

# Largest change of a sequence's logits (relative to their largest magnitude) that is still rounding. In fp32
# packed and alone agree to ~1e-7; bf16 rounding over a deep LLM stays near 1e-2; an LLM whose attention
# crosses into the 32-token sequence packed before it changes by ~0.3 even when tiny and random (OPT: 0.34).
PACKING_TOLERANCE = 0.1


def pack_rows(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packing plan for a ``(B, T)`` mask whose rows each hold one contiguous run of real positions.

    Returns ``source`` and ``position_ids``, both ``(R, C)``: ``R <= B`` rows, as many as compute the
    fewest positions ``R x C``, ``C`` the longest packed row; ``source`` is the flat index ``b * T + t``
    of the padded position each packed position takes (-1 where the packed row is padded);
    ``position_ids`` count from 0 within each sequence (and within the trailing padding, which is then
    a sequence of its own that nothing reads).
    """
    mask = attention_mask.bool().cpu()
    batch, width = mask.shape
    lengths, first = mask.sum(1).tolist(), mask.int().argmax(1).tolist()
    contiguous = (mask.int().cumsum(1) == (torch.arange(width) - torch.tensor(first)[:, None] + 1).clamp(min=0)) | ~mask
    if not contiguous.all() or min(lengths) == 0:
        raise ValueError("pack_rows needs one contiguous, non-empty run of real positions per row")
    # Rows at most about twice the longest sequence, filled evenly (LPT: longest sequence first, each into
    # the emptiest row), as many as compute the fewest positions: from ceil(total / (2 x longest)) rows up to
    # one per sequence, which is the padded batch, so packing never computes more. Longer rows pad less but
    # attend over more positions; on the demo's batches twice was faster than once (13.8-24.7% padding left)
    # or one row for all (docs/throughput.md). Python lists, not tensors: this runs every training step.
    order = sorted(range(batch), key=lambda b: -lengths[b])
    fewest = math.ceil(sum(lengths) / (2 * max(lengths)))
    rows, fill = min((_fill_evenly(order, lengths, n) for n in range(fewest, batch + 1)),
                     key=lambda plan: (len(plan[0]) * max(plan[1]), len(plan[0])))
    capacity = max(fill)
    source, position_ids = [], []
    for members, used in zip(rows, fill):
        source.append([b * width + t for b in members for t in range(first[b], first[b] + lengths[b])]
                      + [-1] * (capacity - used))
        position_ids.append([t for b in members for t in range(lengths[b])] + list(range(capacity - used)))
    device = attention_mask.device
    return torch.tensor(source, device=device), torch.tensor(position_ids, device=device)


def _fill_evenly(order: list[int], lengths: list[int], n_rows: int) -> tuple[list[list[int]], list[int]]:
    """Sequences (``order``: longest first) into ``n_rows`` rows, each into the emptiest; the rows and their fill."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    fill = [0] * n_rows
    emptiest = [(0, r) for r in range(n_rows)]  # a heap of (fill, row)
    for b in order:
        used, r = heapq.heappop(emptiest)
        rows[r].append(b)
        fill[r] = used + lengths[b]
        heapq.heappush(emptiest, (fill[r], r))
    return rows, fill


@torch.no_grad()
def check_llm_keeps_packed_sequences_apart(llm: torch.nn.Module) -> None:
    """Raise :class:`ConfigError` when ``llm`` lets a packed sequence see the one packed before it.

    Runs a 3-token sequence alone and after a 32-token one in each of two rows (positions restarting at 0,
    no attention mask, as :func:`pack_rows` feeds it) and compares its logits. Two rows, as training packs them:
    transformers' flash-attention path recognises packed sequences in a batch of one row only. Two tiny forwards,
    in eval mode so dropout does not count as a difference; the modules' train/eval modes are restored.
    """
    embeddings = llm.get_input_embeddings()
    vocab, device = embeddings.num_embeddings, embeddings.weight.device
    befores = [torch.arange(32, device=device) * step % vocab for step in (7, 5)]  # fixed ids: no random numbers drawn
    tokens = (torch.arange(3, device=device) * 11 + 1) % vocab
    modes = {module: module.training for module in llm.modules()}
    llm.eval()
    try:
        alone = llm(input_ids=tokens[None], position_ids=torch.arange(3, device=device)[None],
                    attention_mask=None, use_cache=False).logits.float()
        positions = torch.cat([torch.arange(32, device=device), torch.arange(3, device=device)])
        packed = llm(input_ids=torch.stack([torch.cat([before, tokens]) for before in befores]),
                     position_ids=torch.stack([positions, positions]),
                     attention_mask=None, use_cache=False).logits[:, 32:].float()
    finally:
        for module, training in modes.items():
            module.training = training
        # These no-grad forwards run inside the training step's autocast region (bf16-mixed) and leave bf16 casts of
        # the trained weights in autocast's cache, which the training forward that follows reuses. Measured under
        # FSDP2 (2 gloo ranks, torch 2.13): the first step's LoRA gradients were missing (None) and reached the
        # optimizer a step late (the run ended up to 2e-3 from one process; LoRA A never moved). One process and DDP
        # were unaffected on torch 2.13 only: before PyTorch's fix of no-grad casts in that cache (pytorch#165068,
        # December 2025; issue #112583) they lose those gradients too. Dropped here, the training forward casts the
        # weights anew (a no-op without autocast).
        torch.clear_autocast_cache()
    change = ((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6)).item()
    if change > PACKING_TOLERANCE:
        name = type(getattr(llm, "get_base_model", lambda: llm)()).__name__
        raise ConfigError(
            f"model.pack_sequences: {name} does not keep packed sequences apart (a sequence's logits change by "
            f"{change:.0%} when another is packed before it: its attention does not follow restarting "
            "position_ids), so packed training would let examples attend to each other",
            fix="set model.pack_sequences=false",
        )
