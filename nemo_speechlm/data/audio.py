"""Reading audio for the model, with errors that name the file and say what to do.

Unreadable files otherwise fail deep in lhotse with a message about every backend it
tried, and empty audio is worse: it reaches the LLM as no speech at all and gets a
confident answer to nothing. Silence of any usable length stays valid input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from lhotse import Recording

from nemo_speechlm.data.manifest import ManifestEntry, ManifestError
from nemo_speechlm.errors import AudioError
from nemo_speechlm.parts.audio_decoding import FORMATS_HINT, unreadable_reason


def read_audio(path: str | Path, sampling_rate: int, offset: float = 0.0, duration: float | None = None) -> np.ndarray:
    """Mono float32 samples of a file (or of ``[offset, offset + duration)`` of it, clipped to the file's
    end) at ``sampling_rate``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Audio file not found: {path}")
    try:
        recording = Recording.from_file(str(path))
        if duration is not None:
            duration = max(0.0, min(duration, recording.duration - offset))
        samples = recording.resample(sampling_rate).load_audio(offset=offset, duration=duration)
    except Exception as e:  # lhotse raises several types, one per backend it tried
        raise AudioError(path, f"cannot read audio ({unreadable_reason(e, path)})", FORMATS_HINT) from e
    return samples.mean(axis=0).astype(np.float32)


def check_audio_length(num_samples: int, sampling_rate: int, min_seconds: float, name: str | Path) -> None:
    """Refuse empty audio and audio shorter than ``min_seconds`` (one encoder frame)."""
    if num_samples == 0:
        raise AudioError(name, "the audio is empty (0 samples)",
                         "give a recording with sound in it (silence is fine, nothing is not)")
    if num_samples < min_seconds * sampling_rate:
        raise AudioError(
            name,
            f"the audio lasts {num_samples / sampling_rate * 1000:.1f} ms, shorter than one encoder frame "
            f"({min_seconds * 1000:.0f} ms)",
            "give a longer recording",
        )


def load_entry_audio(entry: ManifestEntry, sampling_rate: int, min_seconds: float = 0.0) -> np.ndarray:
    """Mono waveform of a manifest line at the model's rate, cut to ``offset``/``duration``; unreadable,
    empty or too short audio (under ``min_seconds``: one encoder frame) raises :class:`ManifestError`."""
    try:
        samples = read_audio(entry["audio_filepath"], sampling_rate, float(entry.get("offset", 0.0) or 0.0),
                             entry.get("duration"))
        check_audio_length(len(samples), sampling_rate, min_seconds, entry["audio_filepath"])
    except AudioError as e:
        raise ManifestError(entry.path, entry.line, str(e), "audio_filepath") from e
    return samples
