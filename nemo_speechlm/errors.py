"""Errors the user can fix: a bad input file, config value or argument.

Library code raises subclasses (:class:`ManifestError`,
:class:`AudioError`, :class:`~nemo_speechlm.parts.checkpoint.CheckpointError`,
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


class AudioError(InputError):
    """Audio the model cannot use; the message names the file (or the waveform)."""

    def __init__(self, name: str | Path, problem: str, fix: str | None = None) -> None:
        super().__init__(f"{name}: {problem}", fix)
        self.name = str(name)


class WorkerInputError(InputError):
    """An :class:`InputError` raised in a DataLoader worker process, as the training process gets it.

    PyTorch re-raises a worker's exception by calling its type with one string, the worker's whole formatted
    traceback (``torch._utils.ExceptionWrapper``); a type that takes other arguments, as ours do, became a
    ``RuntimeError`` traceback instead of the one-line error. The worker raises this type (:meth:`carrying`), whose
    text is the original's message and fix; built from PyTorch's string, it keeps those, from its last line."""

    _FIX = "\t"  # between message and fix in the worker's text (our messages are one line without tabs)

    def __init__(self, worker_traceback: str) -> None:
        last = worker_traceback.rstrip("\n").rsplit(f"{type(self).__name__}: ", 1)[-1]
        message, _, fix = last.partition(self._FIX)
        super().__init__(message, fix or None)

    @classmethod
    def carrying(cls, error: InputError) -> "WorkerInputError":
        """The error a worker raises for ``error``: its text carries the message and the fix across."""
        carrier = cls.__new__(cls)
        Exception.__init__(carrier, f"{error}{cls._FIX}{error.fix or ''}")
        return carrier


class ConfigError(InputError):
    """A config value is missing or unusable; the message names the key."""


class ManifestError(InputError):
    """A manifest line is malformed; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int, problem: str, field_name: str | None = None):
        where = f"{path}:{line}" + (f" field '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field, self.problem = str(path), line, field_name, problem
