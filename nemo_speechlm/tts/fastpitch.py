"""NeMo FastPitch + HiFi-GAN as a :class:`SpeechSynthesizer`: natural-sounding speech when the models are at hand.

Needs NeMo's TTS collection (``pip install "nemo_toolkit[tts]"``) and the two checkpoints:
pretrained names (``tts_en_fastpitch``, ``tts_en_hifigan``, downloaded from NGC on first
use) or local ``.nemo`` files. Nothing is imported or loaded until a ``FastPitchTTS`` is made.

Word alignments: FastPitch predicts a duration per input *token* (phonemes or characters,
with spaces and punctuation as tokens of their own, depending on the model's tokenizer);
turning those into word times needs tokenizer-specific bookkeeping that we cannot check
offline, so ``Synthesis.words`` is empty. Mixed-modal generation does not need word times;
use espeak (``nemo_speechlm.tts.espeak``) where alignments are needed (interleaving).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nemo_speechlm.tts.base import Synthesis
from nemo_speechlm.tts.normalize import normalize_for_tts

__all__ = ["FastPitchTTS"]

INSTALL_HINT = 'pip install "nemo_toolkit[tts]" (NeMo\'s TTS collection and its extras)'


def _tts_models():
    """``(FastPitchModel, HifiGanModel)``, or an ImportError that says what to install."""
    try:
        from nemo.collections.tts.models import FastPitchModel, HifiGanModel
    except Exception as e:  # missing extras surface as various import-time errors
        raise ImportError(f"FastPitchTTS needs NeMo's TTS collection, which failed to import ({e}); {INSTALL_HINT}") from e
    return FastPitchModel, HifiGanModel


def _load(model_class, name: str, device: str):
    """A ``.nemo`` file by path (``restore_from``) or a pretrained name (``from_pretrained``)."""
    if name.endswith(".nemo") or Path(name).is_file():
        if not Path(name).is_file():
            raise FileNotFoundError(f"{model_class.__name__} checkpoint not found: {name}")
        model = model_class.restore_from(name, map_location=device)
    else:
        model = model_class.from_pretrained(name, map_location=device)
    return model.eval().to(device)


class FastPitchTTS:
    """One FastPitch speaker (``speaker`` id for multi-speaker models) at pace ``pace``, resampled to ``sample_rate``.

    ``normalize=True`` expands numbers and abbreviations with :func:`normalize_for_tts` first
    (NeMo's own normalizer is not used, so the text we store is exactly the text spoken);
    ``Synthesis.text`` is that text. ``Synthesis.words`` is empty (see module doc).
    """

    def __init__(
        self,
        fastpitch: str = "tts_en_fastpitch",
        vocoder: str = "tts_en_hifigan",
        device: str = "cpu",
        speaker: int | None = None,
        pace: float = 1.0,
        sample_rate: int = 16000,
        normalize: bool = True,
    ) -> None:
        import torch

        fastpitch_class, hifigan_class = _tts_models()
        if pace <= 0:
            raise ValueError(f"FastPitchTTS pace must be positive, got {pace}")
        self.device = torch.device(device)
        self.spec_generator = _load(fastpitch_class, fastpitch, self.device)
        self.vocoder = _load(hifigan_class, vocoder, self.device)
        n_speakers = int(self.spec_generator.cfg.get("n_speakers", 0) or 0)
        if speaker is not None and not 0 <= speaker < max(n_speakers, 1):
            raise ValueError(f"{fastpitch} has {n_speakers} speakers; speaker={speaker} is out of range")
        self.speaker_id = speaker
        self.pace = float(pace)
        self.sample_rate = int(sample_rate)
        self.native_rate = int(getattr(self.vocoder, "sample_rate", 0) or self.spec_generator.cfg.get("sample_rate", 22050))
        self.normalize = normalize
        name = Path(fastpitch).stem
        self.speaker = f"fastpitch:{name}" + (f"#{speaker}" if speaker is not None else "") + (
            f"@{self.pace:g}" if self.pace != 1.0 else ""
        )

    def __repr__(self) -> str:
        return f"FastPitchTTS(speaker={self.speaker!r}, sample_rate={self.sample_rate})"

    def synthesize(self, text: str) -> Synthesis:
        """Speak ``text``: tokens -> mel spectrogram (FastPitch) -> waveform (HiFi-GAN) -> resample."""
        import torch

        spoken = normalize_for_tts(text) if self.normalize else " ".join(text.split())
        if not any(c.isalnum() for c in spoken):
            raise ValueError(f"FastPitchTTS.synthesize got no speakable text: {text!r} (normalized: {spoken!r})")
        with torch.inference_mode():
            tokens = self.spec_generator.parse(spoken, normalize=False)
            spectrogram = self.spec_generator.generate_spectrogram(tokens=tokens, speaker=self.speaker_id, pace=self.pace)
            audio = self.vocoder.convert_spectrogram_to_audio(spec=spectrogram)
        audio = audio.squeeze(0).float().cpu().numpy()
        if self.native_rate != self.sample_rate:
            import soxr

            audio = soxr.resample(audio, self.native_rate, self.sample_rate)
        return Synthesis(audio=audio.astype(np.float32), sample_rate=self.sample_rate, words=[], text=spoken,
                         speaker=self.speaker)
