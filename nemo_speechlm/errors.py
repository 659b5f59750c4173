"""Errors the user can fix: a bad input file, config value or argument.

Library code raises subclasses (:class:`ManifestError`,
:class:`~nemo_speechlm.data.audio.AudioError`, :class:`~nemo_speechlm.parts.checkpoint.CheckpointError`,
:class:`ConfigError`, ...) whose message names the file (and line and field) and whose ``fix`` says
what to do. Command-line entry points (:mod:`nemo_speechlm.parts.cli`) print them as one line
instead of a traceback; any other exception is a bug of ours and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input from the user; ``fix`` (optional) says what to do about it."""

    fix: str | None = None  # also for subclasses whose __init__ comes from another base (UnknownTaskError)

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class ConfigError(InputError):
    """A config value is missing or unusable; the message names the key."""


class ManifestError(InputError):
    """A manifest line is malformed; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int, problem: str, field_name: str | None = None):
        where = f"{path}:{line}" + (f" field '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field, self.problem = str(path), line, field_name, problem
