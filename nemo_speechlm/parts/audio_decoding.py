"""Decoding a lhotse cut's audio with an error that names the file and says why.

The data checks read audio headers only (format, rate, length), so a file whose body is damaged (a FLAC whose
frames do not decode) is found when it is decoded: by the feature cache, connector pre-alignment or a training
batch. lhotse's own error lists every backend it tried, in a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
from lhotse.cut import Cut

from nemo_speechlm.errors import AudioError

FORMATS_HINT = "check that it is an undamaged audio file (WAV, FLAC, OGG, MP3, ...)"


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
        raise AudioError(name, f"cannot read audio ({unreadable_reason(e, local)})", FORMATS_HINT) from e
    return samples.mean(axis=0).astype(np.float32)


def audio_source_name(cut: Cut) -> str:
    """Where ``cut``'s audio comes from, for an error: its file or URL, else (audio held in memory: Shar, tarred
    manifests) its recording id."""
    recording = getattr(cut, "recording", None)  # (a MixedCut has none)
    if recording is None:
        return f"cut {cut.id}"
    source = recording.sources[0]
    return source.source if source.type in ("file", "url") else f"recording {recording.id} ({source.type})"


def unreadable_reason(error: Exception, path: Path | None) -> str:
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
