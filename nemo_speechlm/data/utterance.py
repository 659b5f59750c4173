"""Identity of an utterance: one home for the keys that name a manifest line's audio segment.

* :func:`utterance_id` — a manifest line (its audio and offset): item keys of behavior
  generation, inference and the benchmark;
* :func:`portable_utterance_id` — the same without the audio's folder: the seed of per-utterance sampling;
* :func:`segment_key` — a line's whole segment (audio, offset and duration): word alignment's
  input and output lines;
* :func:`utterance_key` — the audio a lhotse cut covers (hashed): the feature cache;
* :func:`cut_id` — the id of the cut built from a manifest line;
* :func:`speech_span` / :func:`source_utterance` — an interleaved speech span and the whole
  utterance it belongs to.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lhotse import fastcopy
from lhotse.cut import Cut

def utterance_id(entry) -> str:
    """Stable id of a manifest line: its audio and offset (line numbers shift when files are edited)."""
    return f"{entry['audio_filepath']}@{float(entry.get('offset', 0.0) or 0.0):.3f}"


def portable_utterance_id(entry) -> str:
    """:func:`utterance_id` without the audio's folder: what seeds per-utterance sampling (behavior
    prompts), so the same corpus in another directory (another output folder, machine or clone) draws
    the same prompts. Keyed by the full path, the demo's tasks changed with its ``--out``."""
    return f"{Path(entry['audio_filepath']).name}@{float(entry.get('offset', 0.0) or 0.0):.3f}"


def segment_key(record) -> str:
    """Identifies a manifest line in the input and in the output: the same audio segment."""
    return f"{record['audio_filepath']}|{record.get('offset', 0.0) or 0.0}|{record['duration']}"


def cut_id(entry) -> str:
    """Id of the cut built from a manifest line: the manifest's file name and the line number."""
    return f"{Path(entry.path).stem}-{entry.line}"


def utterance_key(cut: Cut) -> str:
    """Key of the audio a cut covers: source file (or recording id), offset and duration."""
    sources = cut.recording.sources
    source = sources[0].source if sources and sources[0].type == "file" else cut.recording.id
    return hashlib.sha1(f"{os.path.abspath(source)}|{cut.start:.4f}|{cut.duration:.4f}".encode()).hexdigest()


SPAN_SOURCE_START = "span_source_start"
SPAN_SOURCE_DURATION = "span_source_duration"


def speech_span(utterance: Cut, start: float, end: float, tolerance: float = 0.1) -> Cut:
    """The part ``[start, end)`` seconds of ``utterance`` (a lhotse cut by time), remembering its utterance.

    ``end`` may pass the utterance's end by ``tolerance`` (rounded alignment times, as in
    ``validate_words``); the span is clipped to the audio.
    """
    end = min(end, utterance.duration) if end <= utterance.duration + tolerance else end
    if not 0.0 <= start < end <= utterance.duration:
        raise ValueError(f"Span [{start}, {end}) s is outside utterance {utterance.id} ({utterance.duration} s).")
    span = utterance.truncate(offset=start, duration=end - start)
    span.id = f"{utterance.id}_{start:.2f}_{end:.2f}"
    span.custom = {**(span.custom or {}), SPAN_SOURCE_START: utterance.start, SPAN_SOURCE_DURATION: utterance.duration}
    return span


def source_utterance(cut: Cut) -> tuple[Cut, float, float]:
    """The whole utterance a locator's cut belongs to, and the cut's start/end inside it."""
    custom = cut.custom or {}
    if SPAN_SOURCE_START not in custom:
        return cut, 0.0, float("inf")
    start, duration = custom[SPAN_SOURCE_START], custom[SPAN_SOURCE_DURATION]
    source = fastcopy(cut, id=f"{cut.recording.id}_{start:.4f}", start=start, duration=duration, supervisions=[], custom={})
    return source, cut.start - start, cut.end - start
