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

from nemo_speechlm.errors import ConfigError


class FrameStackingAdapter(nn.Module):
    """Stack ``stack`` frames (k-fold downsampling), LayerNorm, Linear-GELU-Linear to ``output_dim``,
    then optionally an RMSNorm whose gain starts at ``output_rms``.

    Optional, for reading words rather than memorising sentences (``docs/connector.md``):
    ``rnn_layers`` bidirectional GRU layers of width ``rnn_dim`` between the LayerNorm and the MLP,
    so each position sees the neighbouring ones in both directions, and ``spec_augment`` (NeMo's
    ``SpectrogramAugmentation`` kwargs) masking bands of feature dimensions and spans of frames of
    the encoder output during training, so no single cue carries a word.

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
        rnn_layers: int = 0,
        rnn_dim: int = 512,
        spec_augment: dict | None = None,
    ) -> None:
        if stack < 1 or hidden_dim < 1 or context_kernel < 1 or rnn_layers < 0:  # (stack 0 divided by zero in fit)
            raise ConfigError(f"model.perception.modality_adapter: stack {stack}, hidden_dim {hidden_dim}, context_kernel "
                              f"{context_kernel} must be 1 or more, rnn_layers {rnn_layers} 0 or more")
        super().__init__()
        self.stack = stack
        self.subsampling_factor = stack
        self.norm = nn.LayerNorm(input_dim * stack)
        self.rnn = None
        if rnn_layers > 0:
            if rnn_dim % 2:
                raise ValueError(f"rnn_dim={rnn_dim} must be even: it is split between the GRU's two directions")
            self.rnn_in = nn.Sequential(nn.Linear(input_dim * stack, rnn_dim), nn.GELU())
            self.rnn = nn.GRU(rnn_dim, rnn_dim // 2, num_layers=rnn_layers, batch_first=True, bidirectional=True)
        mlp_in = rnn_dim if self.rnn is not None else input_dim * stack
        self.mlp = nn.Sequential(nn.Linear(mlp_in, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))
        self.spec_augment = None
        if spec_augment:
            from nemo.collections.asr.modules import SpectrogramAugmentation

            self.spec_augment = SpectrogramAugmentation(**dict(spec_augment))
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
        if self.spec_augment is not None and self.training:
            audio_signal = self.spec_augment(input_spec=audio_signal, length=length)
        x = audio_signal.transpose(1, 2)  # (B, T, C)
        b, t, c = x.shape
        # A clip's last stacked position takes padding frames: zero them, whatever the encoder left there
        # (speechlm2's perception passes the encoder's padded outputs on), so a clip's output does not
        # depend on the batch it is in.
        x = x * (torch.arange(t, device=x.device)[None, :] < length[:, None]).unsqueeze(-1).to(x.dtype)
        pad = (-t) % self.stack
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        x = x.reshape(b, (t + pad) // self.stack, c * self.stack)
        new_length = torch.div(length + self.stack - 1, self.stack, rounding_mode="floor")
        x = self.norm(x)
        if self.rnn is not None:
            packed = nn.utils.rnn.pack_padded_sequence(
                self.rnn_in(x), new_length.cpu(), batch_first=True, enforce_sorted=False
            )
            x, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        if self.context is None:
            x = self.mlp(x)
        else:
            valid = (torch.arange(x.shape[1], device=x.device)[None, :] < new_length[:, None]).unsqueeze(-1)
            h = self.mlp[1](self.mlp[0](x)) * valid  # padding must not leak into real positions
            x = self.mlp[2](h + self.context(h.transpose(1, 2)).transpose(1, 2))
        if self.output_norm is not None:
            x = self.output_norm(x)
        return x.transpose(1, 2), new_length
