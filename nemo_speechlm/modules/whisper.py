"""Whisper as a NeMo-style speech encoder: log-mel front end + the Hugging Face Whisper encoder.

Both classes follow the interfaces speechlm2's ``AudioPerceptionModule`` expects, so
``nemo_speechlm/conf/encoder/whisper*.yaml`` swaps them in for a NeMo preprocessor/encoder pair:

* :class:`WhisperLogMel` — ``forward(input_signal, length) -> (B, n_mels, T), lengths``,
  with ``featurizer.hop_length``/``sample_rate`` for ``token_equivalent_duration``.
* :class:`WhisperEncoder` — ``forward(audio_signal=(B, n_mels, T), length) -> (B, D, T/2), lengths``
  at 50 frames/s, with ``subsampling_factor`` = 2 and ``d_model``.

Why not ``transformers.WhisperModel.encoder`` as is: it refuses anything but 30-second
inputs, has no padding mask, and its feature extractor is numpy-only. We keep its
weights and layers and add variable-length input (Ultravox-style: slice the positional
embeddings, mask padded frames) next to the original padded-window behaviour.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
from transformers.models.whisper.modeling_whisper import WhisperModel

WINDOW_SECONDS = 30.0


class WhisperLogMel(nn.Module):
    """Whisper's log-mel spectrogram in torch (batched, any device).

    Matches ``WhisperFeatureExtractor`` exactly on zero-padded input: the same mel filter
    bank (taken from it), power STFT, ``log10`` clamped to 8 decades below the maximum,
    then ``(x + 4) / 4``. The maximum is taken per utterance over its own frames.
    ``pad_to_window`` zero-pads each batch to 30 s, as Whisper saw in training.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160,
                 pad_to_window: bool = True) -> None:
        super().__init__()
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.pad_to_window = pad_to_window
        extractor = WhisperFeatureExtractor(
            feature_size=n_mels, sampling_rate=sample_rate, n_fft=n_fft, hop_length=hop_length
        )
        self.register_buffer("mel_filters", torch.as_tensor(extractor.mel_filters, dtype=torch.float32).T, persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    @property
    def featurizer(self) -> "WhisperLogMel":
        """AudioPerceptionModule reads ``hop_length``/``sample_rate`` from ``preprocessor.featurizer``."""
        return self

    def get_seq_len(self, length: torch.Tensor) -> torch.Tensor:
        """Frames for ``length`` samples (the STFT's last frame is dropped, as in Whisper)."""
        return torch.div(length, self.hop_length, rounding_mode="floor").long()

    @torch.no_grad()
    def forward(self, input_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 features whatever the training precision (the encoder casts them to its own dtype):
        autocast is off (it would run the filter-bank matmul in bf16) and the buffers are read as
        fp32 (exact unless the module itself was cast, which ``HalfPrecisionForSpeech`` avoids)."""
        with torch.autocast(input_signal.device.type, enabled=False):
            return self._log_mel(input_signal.float(), length)

    def _log_mel(self, signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = int(WINDOW_SECONDS * self.sample_rate) if self.pad_to_window else signal.shape[1]
        if signal.shape[1] > target:
            raise ValueError(
                f"Whisper's padded 30 s window cannot hold {signal.shape[1] / self.sample_rate:.1f} s of audio; "
                "set model.encoder_chunk_size_seconds=30 or the encoder's pad_to_window=false."
            )
        # Zero padding (also past the end, so the last frames see zeros, not reflections, as in Whisper).
        signal = nn.functional.pad(signal, (0, target - signal.shape[1] + self.n_fft // 2))
        positions = torch.arange(signal.shape[1], device=signal.device)
        signal = signal * (positions[None, :] < length[:, None])  # zero anything past each utterance
        stft = torch.stft(signal, self.n_fft, self.hop_length, window=self.window.float(), return_complex=True)
        frames = target // self.hop_length
        power = stft[..., :frames].abs() ** 2
        log_spec = torch.clamp(self.mel_filters.float() @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_spec + 4.0) / 4.0, self.get_seq_len(length)


class WhisperEncoder(nn.Module):
    """The encoder of a Hugging Face Whisper checkpoint, with variable-length input.

    Args:
        pretrained_model: hub id (``openai/whisper-small``) or local directory with a Whisper model.
        d_model: expected width; checked against the checkpoint so adapter configs stay honest.
        pad_to_window: True = the input is a padded 30 s window (Whisper's training condition;
            outputs are cut back to the clip's frames). False = only the clip is encoded,
            padded frames are masked, and the positional embeddings are sliced.
        load_pretrained_weights: False builds the architecture only (weights come from a
            ``.nemo`` restore); the model sets this itself.
        n_mels: expected mel bins (the preprocessor's); checked against the checkpoint.
        lora: peft ``LoraConfig`` kwargs (e.g. ``{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}``)
            to adapt a frozen encoder; the model keeps the ``lora_`` parameters trainable.
        architecture: the checkpoint's ``config.json`` as a dict, stored in the model
            config so a ``.nemo`` restores with no hub access; filled in automatically.
    """

    subsampling_factor = 2  # conv2 has stride 2: 100 mel frames/s -> 50 encoder frames/s

    def __init__(self, pretrained_model: str | None = None, d_model: int | None = None, pad_to_window: bool = True,
                 load_pretrained_weights: bool = True, architecture: dict | None = None,
                 n_mels: int | None = None, lora: dict | None = None) -> None:
        super().__init__()
        if architecture is None and pretrained_model is None:
            raise ValueError("WhisperEncoder needs pretrained_model (a hub id or a directory) or architecture.")
        if load_pretrained_weights and pretrained_model:
            self.encoder = _load_pretrained_encoder(pretrained_model)
        else:
            if isinstance(architecture, DictConfig):  # Hydra hands nested config over as DictConfig
                architecture = OmegaConf.to_container(architecture, resolve=True)
            config = WhisperConfig(**architecture) if architecture else WhisperConfig.from_pretrained(pretrained_model)
            self.encoder = HFWhisperEncoder(config)
        self.pad_to_window = pad_to_window
        self.d_model = self.encoder.config.d_model
        if d_model is not None and d_model != self.d_model:
            raise ValueError(
                f"encoder.d_model={d_model} but the Whisper checkpoint {pretrained_model} has d_model={self.d_model}; "
                "fix d_model in the encoder config (the adapter's input width follows it)."
            )
        if lora:
            from peft import LoraConfig, inject_adapter_in_model

            if isinstance(lora, DictConfig):
                lora = OmegaConf.to_container(lora, resolve=True)
            self.encoder = inject_adapter_in_model(LoraConfig(**lora), self.encoder)
        if n_mels is not None and n_mels != self.encoder.config.num_mel_bins:
            raise ValueError(
                f"encoder.n_mels={n_mels} but the Whisper checkpoint {pretrained_model} expects "
                f"{self.encoder.config.num_mel_bins} mel bins; fix n_mels in the encoder config."
            )

    @property
    def max_audio_seconds(self) -> float:
        """Longest clip encoded in one piece (the positional range; the padded window is the same 30 s).
        Longer clips need ``model.encoder_chunk_size_seconds``; inference chunks them by itself."""
        return WINDOW_SECONDS

    def architecture_config(self) -> dict:
        """The Whisper config to keep in the model config (restore without the hub)."""
        return self.encoder.config.to_diff_dict()

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        dtype = enc.conv1.weight.dtype
        x = audio_signal.to(dtype)
        if not self.pad_to_window:
            # Zero past each clip's end, as the convolutions' own zero padding does for a lone clip,
            # so an utterance encodes the same whatever else is in the batch.
            x = x * _valid(length, x.shape[2])[:, None, :]
        x = nn.functional.gelu(enc.conv1(x))
        if not self.pad_to_window:
            x = x * _valid(length, x.shape[2])[:, None, :]
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)  # (B, T', D)
        out_len = torch.div(length - 1, 2, rounding_mode="floor") + 1
        if x.shape[1] > enc.embed_positions.num_embeddings:
            raise ValueError(
                f"{x.shape[1] / 50:.1f} s of audio exceeds Whisper's 30 s positional range; "
                "set model.encoder_chunk_size_seconds=30."
            )
        x = x + enc.embed_positions.weight[: x.shape[1]]
        x = nn.functional.dropout(x, p=enc.dropout, training=self.training)
        mask = None
        if not self.pad_to_window:
            valid = _valid(out_len, x.shape[1])
            mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, torch.finfo(x.dtype).min)
            mask = mask[:, None, None, :]  # additive, (B, 1, 1, T'): works for eager and SDPA attention
        for layer in enc.layers:
            x = layer(x, mask)
        x = enc.layer_norm(x)
        return x.transpose(1, 2), out_len


def _valid(length: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size)`` bool: True on each row's first ``length`` positions."""
    return torch.arange(size, device=length.device)[None, :] < length[:, None]


def _load_pretrained_encoder(source: str) -> HFWhisperEncoder:
    """Only the encoder of a Whisper checkpoint (the decoder is dropped right after loading)."""
    return WhisperModel.from_pretrained(source).get_encoder()
