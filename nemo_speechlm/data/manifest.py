"""Reading NeMo manifest JSONL with errors that name the file, the line and the field.

NeMo's and lhotse's own readers fail late and vaguely on bad lines (or drop them
silently in fault-tolerant collation), so every manifest we train or evaluate on goes
through :func:`read_manifest` first.
"""
from __future__ import annotations

import codecs
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import soundfile

from nemo_speechlm.errors import ManifestError  # noqa: F401  (its home is errors.py, low enough for parts.cli)

log = logging.getLogger(__name__)


@dataclass
class ManifestEntry:
    """One validated manifest line. ``data`` keeps every original field (paths made absolute).

    ``cut``: the line's audio when it comes from an archive (tarred manifest, Lhotse Shar) rather
    than a file (``nemo_speechlm.data.sources``). ``audio_relative``: the line gave its audio path
    relative to the manifest (see :func:`data_for_output`)."""

    path: str
    line: int
    data: dict
    cut: object = None
    audio_relative: bool = False

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)


@dataclass
class SkipSummary:
    """Counts of lines skipped when the user asked to skip bad input instead of failing."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    lines: set = field(default_factory=set)  # (file, line) of every line skipped

    def add(self, err: ManifestError) -> bool:
        """Count ``err``'s line; False (and not counted) when it was counted before: a pass abandoned half-way
        (a validation limit) is checked again, and its skips were counted again."""
        if (err.path, err.line) in self.lines:
            return False
        key = err.field or "line"
        self.counts[key] += 1
        self.examples.setdefault(key, str(err))
        self.lines.add((err.path, err.line))
        return True

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.total:
            return "no lines skipped"
        parts = [f"{n} x {k} (e.g. {self.examples[k]})" for k, n in self.counts.most_common()]
        return f"{self.total} lines skipped: " + "; ".join(parts)


def resolve_audio_path(manifest_path: str | Path, audio_path: str) -> Path:
    """NeMo convention: relative audio paths are relative to the manifest's directory."""
    p = Path(audio_path).expanduser()
    return p if p.is_absolute() else Path(manifest_path).resolve().parent / p


def data_for_output(entry: ManifestEntry, output_path: str | Path | None) -> dict:
    """``entry``'s fields as a file written at ``output_path`` should hold them: an audio path the manifest
    gave relative stays relative, now to the output's directory (where NeMo and :func:`read_manifest`
    resolve it), so data that moves or is mounted elsewhere as a folder keeps working; an absolute one stays
    absolute. Generated files (behaviors, word alignments, SQA) used to make every path absolute, so a
    portable dataset lost its portability in the first step. ``output_path=None``: absolute paths."""
    if output_path is None or not entry.audio_relative:
        return dict(entry.data)
    output_dir = Path(output_path).expanduser().resolve().parent
    return {**entry.data, "audio_filepath": os.path.relpath(entry.data["audio_filepath"], output_dir)}


def audio_duration(path: Path) -> float:
    info = soundfile.info(str(path))
    return info.frames / info.samplerate


def validate_audio_fields(
    path: str | Path,
    line: int,
    data: dict,
    duration_tolerance: float = 0.1,
    check_audio: bool = True,
    min_duration: float = 0.0,
) -> None:
    """Check ``audio_filepath``/``duration``/``offset``; make the audio path absolute in place.
    ``min_duration`` is the shortest segment the consumer can use (a model: one encoder frame)."""
    audio = data.get("audio_filepath")
    if not isinstance(audio, str) or not audio:
        raise ManifestError(path, line, f"missing or not a string (got {audio!r})", "audio_filepath")
    duration = data.get("duration")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration <= 0:
        raise ManifestError(path, line, f"must be a positive number of seconds (got {duration!r})", "duration")
    if duration < min_duration:
        raise ManifestError(
            path, line, f"{duration} s is shorter than one encoder frame ({min_duration * 1000:.0f} ms)", "duration"
        )
    offset = data.get("offset", 0.0) or 0.0
    if not isinstance(offset, (int, float)) or offset < 0:
        raise ManifestError(path, line, f"must be a non-negative number of seconds (got {offset!r})", "offset")
    audio_path = resolve_audio_path(path, audio)
    data["audio_filepath"] = str(audio_path)
    if not check_audio:
        return
    if not audio_path.is_file():
        raise ManifestError(path, line, f"audio file does not exist: {audio_path}", "audio_filepath")
    try:
        file_duration = audio_duration(audio_path)
    except Exception as e:  # soundfile raises several types for unreadable files
        raise ManifestError(path, line, f"cannot read audio file {audio_path}: {e}", "audio_filepath") from e
    if file_duration == 0:
        raise ManifestError(path, line, f"the audio file is empty (0 samples): {audio_path}", "audio_filepath")
    if offset + duration > file_duration + duration_tolerance:
        raise ManifestError(
            path,
            line,
            f"offset {offset} + duration {duration} exceeds the file's length {file_duration:.3f}s ({audio_path})",
            "duration",
        )
    if offset == 0 and "offset" not in data and abs(duration - file_duration) > duration_tolerance:
        raise ManifestError(
            path,
            line,
            f"duration {duration} does not match the file's length {file_duration:.3f}s ({audio_path}); "
            f"fix the manifest or give an `offset` for a segment",
            "duration",
        )


def read_manifest(
    path: str | Path,
    required_text_fields: tuple[str, ...] = ("text",),
    has_audio: bool = True,
    check_audio: bool = True,
    skip_invalid: bool = False,
    summary: SkipSummary | None = None,
    duration_tolerance: float = 0.1,
    min_duration: float = 0.0,
    start_line: int = 1,
) -> Iterator[ManifestEntry]:
    """Yield validated entries of a JSONL manifest, lazily.

    Every problem raises :class:`ManifestError` naming file, line and field; with
    ``skip_invalid`` the line is skipped and counted in ``summary`` instead. ``min_duration``:
    see :func:`validate_audio_fields`. Lines before ``start_line`` (1-based) are passed over unread,
    for resuming after lines already handled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Manifest not found: {path}")
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no < start_line or not raw.strip():
                continue
            try:
                data, relative = _parse_line(path, line_no, decode_line(path, line_no, raw), required_text_fields,
                                             has_audio, check_audio, duration_tolerance, min_duration)
                yield ManifestEntry(str(path), line_no, data, audio_relative=relative)
            except ManifestError as e:
                if not skip_invalid:
                    raise
                if summary is None or summary.add(e):
                    log.warning("Skipping %s", e)


def decode_line(path, line: int, raw: bytes) -> str:
    """One line of a JSONL file as text: a line that is not UTF-8 is a :class:`ManifestError` naming it (skippable),
    where decoding the whole file stopped every tool at that line with a traceback."""
    try:
        # a file's first line may start with a byte-order mark (Windows editors): json.loads refused it
        return (raw.removeprefix(codecs.BOM_UTF8) if line == 1 else raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(path, line, f"not valid UTF-8 (byte {e.object[e.start]:#04x} at byte {e.start + 1})") from None


def check_text_fields(path, line: int, data: dict, required_text_fields: tuple[str, ...]) -> None:
    """Each of ``required_text_fields`` must be a non-empty string."""
    for name in required_text_fields:
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(path, line, f"missing or empty text (got {value!r})", name)


def _parse_line(path, line_no, raw, required_text_fields, has_audio, check_audio, duration_tolerance,
                min_duration) -> tuple[dict, bool]:
    """The line's fields, validated, and whether its audio path was relative (before it was made absolute)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise ManifestError(path, line_no, f"expected a JSON object, got {type(data).__name__}")
    check_text_fields(path, line_no, data, required_text_fields)
    audio = data.get("audio_filepath")
    relative = has_audio and isinstance(audio, str) and not Path(audio).expanduser().is_absolute()
    if has_audio:
        validate_audio_fields(path, line_no, data, duration_tolerance, check_audio, min_duration)
    return data, relative
