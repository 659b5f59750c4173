"""Modality adapters: encoder frames -> LLM-width embeddings.

Two families ship as configs (``nemo_speechlm/conf/adapter/``):

* ``conformer`` — NeMo's own ``ConformerEncoder`` with no subsampling, followed by the
  perception module's linear projection (VoiceTextBlender). No code here: it is a config.
* ``stack_mlp`` — :class:`FrameStackingAdapter` below (BLSP / Ultravox): stack ``k``
  consecutive frames, then a 2-layer MLP. NeMo has no such connector.
"""
from __future__ import annotations

import torch
from torch import nn


class FrameStackingAdapter(nn.Module):
    """Stack ``stack`` frames (k-fold downsampling), LayerNorm, Linear-GELU-Linear to ``output_dim``,
    then optionally an RMSNorm whose gain starts at ``output_rms``.

    Follows NeMo's adapter interface: ``forward(audio_signal: (B, C, T), length: (B,))``
    returns ``(B, output_dim, T // stack)`` and the new lengths. ``subsampling_factor``
    feeds ``AudioPerceptionModule.token_equivalent_duration``.

    Why the output norm: the LLM was trained on its own input embeddings, whose scale is fixed
    (RMS 0.133 per vector for SmolLM2); an unconstrained MLP drifts to ~10x that within a few
    hundred steps. An RMSNorm initialised to the embeddings' RMS (Ultravox's connector) keeps
    speech positions on the scale the LLM expects. ``output_rms: auto`` (configs) is resolved to
    the LLM's embedding RMS by ``build_perception``; ``None`` leaves the output unnormalised.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        stack: int = 4,
        hidden_dim: int = 1024,
        output_rms: float | None = None,
        context_kernel: int = 1,
    ) -> None:
        super().__init__()
        self.stack = stack
        self.subsampling_factor = stack
        self.norm = nn.LayerNorm(input_dim * stack)
        self.mlp = nn.Sequential(nn.Linear(input_dim * stack, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))
        # Optional depthwise convolution over neighbouring positions in the hidden layer, so each
        # output sees a whole word (~0.4 s at kernel 5 x 80 ms) rather than its own `stack` frames.
        self.context = None
        if context_kernel > 1:
            self.context = nn.Conv1d(hidden_dim, hidden_dim, context_kernel, padding=context_kernel // 2, groups=hidden_dim)
        self.output_norm = None
        if output_rms is not None:
            self.output_norm = nn.RMSNorm(output_dim, eps=1e-6)
            nn.init.constant_(self.output_norm.weight, float(output_rms))

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = audio_signal.transpose(1, 2)  # (B, T, C)
        b, t, c = x.shape
        pad = (-t) % self.stack
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        x = x.reshape(b, (t + pad) // self.stack, c * self.stack)
        new_length = torch.div(length + self.stack - 1, self.stack, rounding_mode="floor")
        if self.context is None:
            x = self.mlp(self.norm(x))
        else:
            valid = (torch.arange(x.shape[1], device=x.device)[None, :] < new_length[:, None]).unsqueeze(-1)
            h = self.mlp[1](self.mlp[0](self.norm(x))) * valid  # padding must not leak into real positions
            x = self.mlp[2](h + self.context(h.transpose(1, 2)).transpose(1, 2))
        if self.output_norm is not None:
            x = self.output_norm(x)
        return x.transpose(1, 2), new_length
