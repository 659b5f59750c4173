"""Modality adapters: encoder frames -> LLM-width embeddings.

Two families ship as configs (``conf/adapter/``):

* ``conformer`` — NeMo's own ``ConformerEncoder`` with no subsampling, followed by the
  perception module's linear projection (VoiceTextBlender). No code here: it is a config.
* ``stack_mlp`` — :class:`FrameStackingAdapter` below (BLSP / Ultravox): stack ``k``
  consecutive frames, then a 2-layer MLP. NeMo has no such connector.
"""
from __future__ import annotations

import torch
from torch import nn


class FrameStackingAdapter(nn.Module):
    """Stack ``stack`` frames (k-fold downsampling), LayerNorm, Linear-GELU-Linear to ``output_dim``.

    Follows NeMo's adapter interface: ``forward(audio_signal: (B, C, T), length: (B,))``
    returns ``(B, output_dim, T // stack)`` and the new lengths. ``subsampling_factor``
    feeds ``AudioPerceptionModule.token_equivalent_duration``.
    """

    def __init__(self, input_dim: int, output_dim: int, stack: int = 4, hidden_dim: int = 1024) -> None:
        super().__init__()
        self.stack = stack
        self.subsampling_factor = stack
        self.norm = nn.LayerNorm(input_dim * stack)
        self.mlp = nn.Sequential(nn.Linear(input_dim * stack, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = audio_signal.transpose(1, 2)  # (B, T, C)
        b, t, c = x.shape
        pad = (-t) % self.stack
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        x = x.reshape(b, (t + pad) // self.stack, c * self.stack)
        x = self.mlp(self.norm(x))
        new_length = torch.div(length + self.stack - 1, self.stack, rounding_mode="floor")
        return x.transpose(1, 2), new_length
