"""Half-precision training with the audio front end (waveform -> mel features) kept in fp32.

NeMo's ``resolve_trainer_cfg`` turns ``trainer.precision=bf16-true`` (or ``fp16-true``) into
its ``HalfPrecisionForAudio`` plugin, which keeps batch tensors whose key contains ``audio``
(``audios``, ``audio_lens``, ``audio_segments``) in fp32 and converts the rest. We reuse it
and change one thing: its ``convert_module`` is ``module.to(bf16)``, which also rounds the
preprocessor's fp32 buffers (mel filter bank, STFT window) to bf16, so the mel features
would be computed with bf16-rounded filters (and :class:`~nemo_speechlm.modules.whisper.WhisperLogMel`
failed outright: ``expected scalar type Float but found BFloat16``). :class:`HalfPrecisionForSpeech`
casts everything except the preprocessors; their fp32 features are cast to the encoder's
dtype by the model (``SpeechLMModel``'s encoder stage). ``bf16-mixed`` needs no plugin:
autocast leaves the weights in fp32 and both preprocessors disable autocast themselves.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from nemo.collections.asr.modules.audio_preprocessing import AudioPreprocessor
from nemo.utils.trainer_utils import HalfPrecisionForAudio
from typing_extensions import override


def is_audio_front_end(module: torch.nn.Module) -> bool:
    """A waveform -> features preprocessor: NeMo's ``AudioPreprocessor`` family or our ``WhisperLogMel``."""
    from nemo_speechlm.modules.whisper import WhisperLogMel

    return isinstance(module, (AudioPreprocessor, WhisperLogMel))


@contextlib.contextmanager
def audio_front_ends_detached(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily unregister every audio front end inside ``module`` so that ``module.to(dtype)``
    leaves them (their fp32 buffers, exactly) untouched; re-registered on exit."""
    detached = []
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and is_audio_front_end(child):
                detached.append((parent, name, child))
    try:
        for parent, name, _ in detached:
            parent._modules[name] = None  # Module._apply skips None children
        yield
    finally:
        for parent, name, child in detached:
            parent._modules[name] = child


class HalfPrecisionForSpeech(HalfPrecisionForAudio):
    """NeMo's ``HalfPrecisionForAudio`` (fp32 audio inputs) that also keeps the audio front ends in fp32."""

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        with audio_front_ends_detached(module):
            return super().convert_module(module)


def resolve_precision_plugins(trainer_cfg: dict) -> dict:
    """Swap NeMo's ``HalfPrecisionForAudio`` (set by ``resolve_trainer_cfg``) for :class:`HalfPrecisionForSpeech`."""
    plugins = trainer_cfg.get("plugins")
    if plugins:
        trainer_cfg["plugins"] = [
            HalfPrecisionForSpeech(p.precision) if type(p) is HalfPrecisionForAudio else p for p in plugins
        ]
    return trainer_cfg


def fastest_training_precision() -> str:
    """``trainer.precision`` for the fastest training this machine does well: ``bf16-mixed`` where it multiplies
    bf16 natively (a GPU with bf16, or a CPU with AVX512-BF16 or AMX), else ``32``.

    Measured on the demo (2 CPU cores with AVX512-BF16, packed rows): an MTBI step took 1.9 s in bf16-mixed
    against 2.4-2.7 s in fp32, with ROUGE-L 0.501 / 0.404 / 0.363 against 0.515 / 0.407 / 0.386 (docs/demo.md).
    CPUs without native bf16 emulate it and are slower than fp32."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32"  # no public query for the CPU
