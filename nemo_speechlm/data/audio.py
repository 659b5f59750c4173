"""Reading audio for the model, with errors that name the file and say what to do.

Unreadable files otherwise fail deep in lhotse with a message about every backend it
tried, and empty audio is worse: it reaches the LLM as no speech at all and gets a
confident answer to nothing. Silence of any usable length stays valid input.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
from lhotse import Recording
from lhotse.cut import Cut

from nemo_speechlm.data.manifest import ManifestEntry, ManifestError
from nemo_speechlm.errors import InputError

_FORMATS_HINT = "check that it is an undamaged audio file (WAV, FLAC, OGG, MP3, ...)"


class AudioError(InputError):
    """Audio the model cannot use; the message names the file (or the waveform)."""

    def __init__(self, name: str | Path, problem: str, fix: str | None = None) -> None:
        super().__init__(f"{name}: {problem}", fix)
        self.name = str(name)


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
        raise AudioError(path, f"cannot read audio ({_unreadable_reason(e, path)})", _FORMATS_HINT) from e
    return samples.mean(axis=0).astype(np.float32)


def read_cut_audio(cut: Cut, sampling_rate: int | None = None) -> np.ndarray:
    """Mono float32 samples of ``cut`` (at ``sampling_rate``, default the cut's). The data checks read the
    files' headers only, so a file whose body is damaged is found here, when it is decoded: that raises
    :class:`AudioError` naming it (lhotse's error listed every backend it tried, in a traceback)."""
    try:
        resampled = cut if sampling_rate in (None, cut.sampling_rate) else cut.resample(sampling_rate)
        samples = resampled.load_audio()
    except MemoryError:
        raise
    except Exception as e:  # lhotse raises several types, one per backend it tried
        name = audio_source_name(cut)
        local = Path(name) if os.path.isfile(name) else None  # (Path.is_file raises on an overlong name)
        raise AudioError(name, f"cannot read audio ({_unreadable_reason(e, local)})", _FORMATS_HINT) from e
    return samples.mean(axis=0).astype(np.float32)


def audio_source_name(cut: Cut) -> str:
    """Where ``cut``'s audio comes from, for an error: its file or URL, else (audio held in memory: Shar, tarred
    manifests) its recording id."""
    recording = getattr(cut, "recording", None)  # (a MixedCut has none)
    if recording is None:
        return f"cut {cut.id}"
    source = recording.sources[0]
    return source.source if source.type in ("file", "url") else f"recording {recording.id} ({source.type})"


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


def _unreadable_reason(error: Exception, path: Path | None) -> str:
    """soundfile's one-line reason: why the header does not open ("Format not recognised"), else why decoding
    failed ("flac decoder lost sync", from lhotse's line for its libsndfile backend); else lhotse's first line."""
    if path is not None:
        try:
            soundfile.info(str(path))
        except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError
            return str(e).split("': ", 1)[-1].rstrip(".")
    lines = str(error).strip().splitlines()
    for line in lines:  # "Exception #0 (<class '...LibsndfileBackend'>): <class '...LibsndfileError'>: Error : <why>."
        if "LibsndfileError" in line:
            return line.rsplit(">: ", 1)[-1].removeprefix("Error : ").rstrip(".")
    return lines[0] if lines else type(error).__name__
