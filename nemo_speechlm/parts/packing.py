"""Sequence packing for a training step: a padded batch's sequences laid end to end in fewer rows.

The LLM computes every position of a row, padding included; on the demo's MTBI batches (8 examples,
not bucketed) 29.8% of the positions are padding (docs/throughput.md). Packing puts the same
sequences into rows about twice as long as its longest sequence, so the
step sees exactly the same examples and targets but computes fewer positions. Bucketing cuts padding
too, but changes which examples share a step, and that cost the demo's answers quality.

The math is unchanged: each packed sequence's positions restart at 0, from which ``transformers``
builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``, used when the
attention mask is ``None``), so a sequence attends only to itself; rotary embeddings depend on
relative positions only, so a sequence that started after left padding scores the same.
"""
from __future__ import annotations

import math

import torch

__all__ = ["pack_rows"]


def pack_rows(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packing plan for a ``(B, T)`` mask whose rows each hold one contiguous run of real positions.

    Returns ``source`` and ``position_ids``, both ``(R, C)``: ``R <= B`` rows, as many as compute the
    fewest positions ``R x C``, ``C`` the longest packed row; ``source`` is the flat index ``b * T + t`` of
    the padded position each packed position takes (-1 where the packed row is padded), ``position_ids`` count from 0 within each
    sequence (and within the trailing padding, which is then a sequence of its own that nothing reads).
    """
    mask = attention_mask.bool().cpu()
    batch, width = mask.shape
    lengths = mask.sum(1)
    first = mask.int().argmax(1)
    contiguous = (mask.int().cumsum(1) == (torch.arange(width) - first[:, None] + 1).clamp(min=0)) | ~mask
    if not contiguous.all() or not (lengths > 0).all():
        raise ValueError("pack_rows needs one contiguous, non-empty run of real positions per row")
    # Rows at most about twice the longest sequence, filled evenly (LPT: longest sequence first, each into
    # the emptiest row), as many as compute the fewest positions: from ceil(total / (2 x longest)) rows up to
    # one per sequence, which is the padded batch, so packing never computes more. Longer rows pad less but
    # attend over more positions; on the demo's batches twice was faster than once (13.8-24.7% padding left)
    # or one row for all (docs/throughput.md).
    order = sorted(range(batch), key=lambda i: -int(lengths[i]))
    fewest = math.ceil(int(lengths.sum()) / (2 * int(lengths.max())))
    rows = min((_fill_evenly(order, lengths, n) for n in range(fewest, batch + 1)),
               key=lambda plan: (len(plan) * max(sum(int(lengths[b]) for b in row) for row in plan), len(plan)))
    capacity = max(sum(int(lengths[b]) for b in row) for row in rows)
    source = torch.full((len(rows), capacity), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), capacity), dtype=torch.long)
    for r, members in enumerate(rows):
        column = 0
        for b in members:
            n, start = int(lengths[b]), int(first[b])
            source[r, column : column + n] = b * width + torch.arange(start, start + n)
            position_ids[r, column : column + n] = torch.arange(n)
            column += n
        position_ids[r, column:] = torch.arange(capacity - column)
    device = attention_mask.device
    return source.to(device), position_ids.to(device)


def _fill_evenly(order: list[int], lengths: torch.Tensor, n_rows: int) -> list[list[int]]:
    """Sequences (``order``: longest first) into ``n_rows`` rows, each into the emptiest row."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    fill = [0] * n_rows
    for b in order:
        r = fill.index(min(fill))
        rows[r].append(b)
        fill[r] += int(lengths[b])
    return rows
