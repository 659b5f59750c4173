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

bf16-true keeps no fp32 copy of the weights that train: an AdamW update smaller than half a bf16
step of its weight (about ``|w| / 512``) rounds away. Measured on plain SFT (tiny parts, lr 1e-4,
20 steps): 21% of the trained weights changed at all, none of the LayerNorm gains, against every
one in fp32 and in bf16-mixed. ``frozen_weights_dtype=bfloat16`` with ``bf16-mixed``
(:class:`FrozenWeightsInBF16`) keeps bf16-true's memory for the frozen weights (the LLM, a frozen
encoder) and fp32 for the trained ones and their optimizer state.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from nemo.collections.asr.modules.audio_preprocessing import AudioPreprocessor
from nemo.utils import logging
from nemo.utils.trainer_utils import HalfPrecisionForAudio
from typing_extensions import override

from nemo_speechlm.errors import ConfigError

# ``frozen_weights_dtype``: how the frozen weights are stored under bf16-mixed (null: fp32, as Lightning keeps them).
FROZEN_WEIGHTS_DTYPES = ("bfloat16",)


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


class FrozenWeightsInBF16(MixedPrecision):
    """bf16-mixed (autocast; trained weights, their gradients and optimizer state in fp32) with the frozen weights
    stored in bf16, as bf16-true stores them: autocast multiplies in bf16 anyway, so only their memory changes (and
    the few ops autocast keeps in fp32, e.g. a norm's gain, read them rounded to bf16). The audio front ends stay
    fp32, and so do buffers and BatchNorm's weights (beside its fp32 statistics). Frozen means
    ``requires_grad=False`` when Lightning converts the model in ``fit`` (after MTBI's connector pre-alignment has
    frozen the connector)."""

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        with audio_front_ends_detached(module):
            # BatchNorm (NeMo's Conformers, the conformer adapter) keeps its weights in fp32 beside its fp32 running
            # statistics: torch's batch_norm refuses bf16 weights with fp32 statistics ("expected scalar type
            # BFloat16 but found Float"), with or without autocast.
            batch_norm = {id(p) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                          for p in m.parameters(recurse=False)}
            frozen = [p for p in module.parameters()
                      if not p.requires_grad and p.is_floating_point() and id(p) not in batch_norm]
        for param in frozen:
            param.data = param.data.to(torch.bfloat16)
        return module


def resolve_precision_plugins(trainer_cfg: dict, frozen_weights_dtype: str | None = None) -> dict:
    """Swap NeMo's ``HalfPrecisionForAudio`` (set by ``resolve_trainer_cfg``) for :class:`HalfPrecisionForSpeech`;
    ``frozen_weights_dtype=bfloat16`` turns ``bf16-mixed`` into :class:`FrozenWeightsInBF16`."""
    plugins = trainer_cfg.get("plugins")
    if plugins:
        trainer_cfg["plugins"] = [
            HalfPrecisionForSpeech(p.precision) if type(p) is HalfPrecisionForAudio else p for p in plugins
        ]
    if frozen_weights_dtype is None:
        return trainer_cfg
    if frozen_weights_dtype not in FROZEN_WEIGHTS_DTYPES:
        raise ConfigError(f"config: frozen_weights_dtype is {frozen_weights_dtype!r}, not one of "
                          f"{', '.join(FROZEN_WEIGHTS_DTYPES)}", "frozen_weights_dtype=bfloat16 (with "
                          "trainer.precision=bf16-mixed), or null")
    if str(trainer_cfg.get("precision")) != "bf16-mixed":
        raise ConfigError(f"config: frozen_weights_dtype={frozen_weights_dtype} needs trainer.precision=bf16-mixed (it is "
                          f"{trainer_cfg.get('precision')!r}): the bf16 frozen weights meet fp32 ones under autocast",
                          "set trainer.precision=bf16-mixed, or frozen_weights_dtype=null")
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    device = "cpu" if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()) else "cuda"
    trainer_cfg.pop("precision")
    trainer_cfg["plugins"] = [*(trainer_cfg.get("plugins") or []), FrozenWeightsInBF16(device)]
    return trainer_cfg


def warn_if_trained_weights_in_half_precision(precision, model: torch.nn.Module) -> None:
    """bf16-true / fp16-true with weights that train: say that small updates round away (module docstring)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if str(precision) in ("bf16-true", "16-true", "fp16-true") and trained:
        logging.warning(
            f"trainer.precision={precision} stores the {trained:,} trained weights in half precision with no fp32 "
            "copy: an update below about |w|/512 rounds away (measured at lr 1e-4: 21% of the weights moved in 20 "
            "steps, no LayerNorm gain). trainer.precision=bf16-mixed frozen_weights_dtype=bfloat16 trains them in "
            "fp32 and keeps the frozen weights in bf16 (nemo_speechlm/parts/precision.py)")


def fastest_training_precision() -> str:
    """``trainer.precision`` for the fastest training this machine does well: ``bf16-mixed`` where it multiplies
    bf16 natively (a GPU with bf16, or a CPU with AVX512-BF16 or AMX), else ``32``.

    Measured on the demo (2 CPU cores with AVX512-BF16, packed rows): an MTBI step took 1.9 s in bf16-mixed
    against 2.4-2.7 s in fp32, with ROUGE-L 0.501 / 0.404 / 0.363 against 0.515 / 0.407 / 0.386 (docs/demo.md).
    CPUs without native bf16 emulate it and are slower than fp32."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32"  # no public query for the CPU
