"""The one TTS interface data generation needs: text in, audio plus word alignments out.

Synthetic speech is only useful to us when we know where each word is (speech-text
interleaving cuts utterances at word boundaries), so alignments are part of the result,
not an optional extra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Synthesis:
    """One synthesized utterance.

    ``words`` holds one ``{"word", "start", "end"}`` dict (seconds) per whitespace token of
    ``text``, in order, so ``" ".join(w["word"] for w in words) == text``. Spans are
    monotone and non-overlapping; the silence between words belongs to no word.
    ``text`` is what was actually spoken (after normalization), which is the transcript.
    """

    audio: np.ndarray
    sample_rate: int
    words: list[dict] = field(default_factory=list)
    text: str = ""
    speaker: str = ""

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


@runtime_checkable
class SpeechSynthesizer(Protocol):
    """Anything that speaks text as one named speaker at a fixed sample rate."""

    sample_rate: int
    speaker: str

    def synthesize(self, text: str) -> Synthesis:
        ...
