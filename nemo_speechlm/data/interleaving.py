"""Speech-text interleaving (MTBI): a user turn that alternates text and speech spans of one utterance.

Given word alignments (``words: [{"word", "start", "end"}]``), some word runs stay text
and the others are replaced by the matching stretch of the recording, cut by time. The
listener (the LLM) gets the same content, partly read and partly heard, which ties the
adapter's output to the LLM's word embeddings. Pure functions: words in, spans out.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from omegaconf import DictConfig


@dataclass(frozen=True)
class InterleaveConfig:
    """How often and how finely to interleave (``interleave`` in an ``mtbi_behaviors`` data config).

    prob: share of examples that are interleaved (0 = always plain speech).
    text_span_words / speech_span_words: inclusive ``[min, max]`` words per text / speech run.
    """

    prob: float = 0.0
    text_span_words: tuple[int, int] = (1, 4)
    speech_span_words: tuple[int, int] = (1, 4)

    @classmethod
    def from_config(cls, cfg: DictConfig | dict | None) -> "InterleaveConfig":
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"prob", "text_span_words", "speech_span_words"}
        if unknown:
            raise ValueError(f"Unknown interleave keys {sorted(unknown)}; known: prob, text_span_words, speech_span_words")
        out = cls(
            prob=float(cfg.get("prob", cls.prob)),
            text_span_words=tuple(cfg.get("text_span_words", cls.text_span_words)),
            speech_span_words=tuple(cfg.get("speech_span_words", cls.speech_span_words)),
        )
        if not 0.0 <= out.prob <= 1.0:
            raise ValueError(f"interleave.prob must be in [0, 1], got {out.prob}")
        for name in ("text_span_words", "speech_span_words"):
            lo, hi = getattr(out, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"interleave.{name} must be [min, max] with 1 <= min <= max, got {[lo, hi]}")
        return out


@dataclass(frozen=True)
class Span:
    """Words ``[first, last)`` of the utterance, as text or as speech ``[start, end)`` seconds."""

    first: int
    last: int
    is_speech: bool
    text: str
    start: float = 0.0
    end: float = 0.0


def validate_words(words: object, duration: float, tolerance: float = 0.1) -> list[dict]:
    """Check an alignment; raises ``ValueError`` saying which word is wrong and why."""
    if not isinstance(words, list) or not words:
        raise ValueError("`words` must be a non-empty list of {word, start, end}")
    previous_end = 0.0
    for i, w in enumerate(words):
        if not isinstance(w, dict) or not {"word", "start", "end"} <= set(w):
            raise ValueError(f"words[{i}] must be an object with word, start, end; got {w!r}")
        if not str(w["word"]).strip():
            raise ValueError(f"words[{i}] has an empty word")
        start, end = float(w["start"]), float(w["end"])
        if not 0.0 <= start <= end:
            raise ValueError(f"words[{i}] ({w['word']!r}) has start {start} > end {end} or a negative time")
        if start < previous_end - 1e-3:
            raise ValueError(f"words[{i}] ({w['word']!r}) starts at {start} s, before the previous word ends ({previous_end} s): out of order")
        if end > duration + tolerance:
            raise ValueError(f"words[{i}] ({w['word']!r}) ends at {end} s, beyond the audio duration {duration} s")
        previous_end = end
    return words


def choose_spans(words: Sequence[dict], cfg: InterleaveConfig, rng: random.Random) -> list[Span]:
    """Alternate text and speech runs over ``words``; at least one of each when there are 2+ words."""
    n = len(words)
    if n < 2:
        return [_speech_span(words, 0, n)]
    speech = rng.random() < 0.5
    spans, i = [], 0
    while i < n:
        lo, hi = cfg.speech_span_words if speech else cfg.text_span_words
        j = min(n, i + rng.randint(lo, hi))
        spans.append(_speech_span(words, i, j) if speech else _text_span(words, i, j))
        i, speech = j, not speech
    if len(spans) == 1:  # one run covered everything: split it so both modalities appear
        cut = rng.randint(1, n - 1)
        first_is_speech = spans[0].is_speech
        spans = [
            _speech_span(words, 0, cut) if first_is_speech else _text_span(words, 0, cut),
            _text_span(words, cut, n) if first_is_speech else _speech_span(words, cut, n),
        ]
    return spans


def _speech_span(words: Sequence[dict], first: int, last: int) -> Span:
    return Span(first, last, True, _join(words, first, last), float(words[first]["start"]), float(words[last - 1]["end"]))


def _text_span(words: Sequence[dict], first: int, last: int) -> Span:
    return Span(first, last, False, _join(words, first, last))


def _join(words: Sequence[dict], first: int, last: int) -> str:
    return " ".join(str(w["word"]).strip() for w in words[first:last])
