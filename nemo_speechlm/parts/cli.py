"""Command-line entry points: an error the user caused is one line on stderr and exit code 2.

Every command (``speechlm-infer``, ``examples/*.py``) runs its ``main`` through :func:`run_cli`
(argparse scripts, with :class:`CommandParser`) or is decorated with :func:`hydra_command`
(training scripts). Errors a user causes and can fix — bad files, config values and arguments
(:class:`~nemo_speechlm.errors.InputError` and the foreign types in :data:`USER_ERRORS`) — print

    error: <file>[:line][ field '<name>']: <what is wrong> — <what to do>

``--debug`` anywhere on the command line (or ``NEMO_SPEECHLM_DEBUG=1``) shows them with their
traceback instead. Every other exception is a bug of ours and keeps its traceback.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Sequence, TypeVar

from hydra.errors import HydraException
from nemo.core.classes.common import UnsafeTargetError
from nemo.core.config import hydra_runner
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from nemo_speechlm.errors import InputError, ManifestError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NEMO_SPEECHLM_DEBUG"
USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process ended by SIGINT
# Errors that come from the user's input, not from a bug: bad files, configs and arguments.
USER_ERRORS = (
    InputError,
    UnsafeTargetError,  # a config naming a class outside NeMo's allow-list
    FileNotFoundError,
    FileExistsError,  # an output under an existing file (mkdir)
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    MissingMandatoryValue,  # a `???` config value left unset
    HydraException,  # bad overrides, unknown config group options
)
SKIP_FLAG_HINT = "pass --skip-invalid"
SKIP_CONFIG_HINT = "set skip_invalid: true on that data input"

T = TypeVar("T")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes: 0 or less was taken and failed later with a traceback."""
    return _int_at_least(text, 1, "1 or more")


def count_or_all(text: str) -> int:
    """An argparse ``type`` for "how many, 0 = all": a negative count sliced items off the end (-1: all but one)."""
    return _int_at_least(text, 0, "0 (all) or more")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


class UsageError(InputError):
    """A bad command-line argument (what argparse would print with the usage text)."""


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError`, so that :func:`run_cli` prints one line;
    it lists ``--debug`` in its help (``run_cli`` acts on the flag before parsing)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true",
                          help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)")

    def error(self, message: str):
        raise UsageError(message, f"see {self.prog} --help")


def run_cli(main: Callable[[list[str]], T], argv: Sequence[str] | None = None, skip_hint: str | None = None) -> T:
    """Run ``main(args)`` (``args``: ``argv`` or the command line, without ``--debug``); user errors end the
    process with one line on stderr and exit code 2. ``skip_hint`` tells how the command skips bad lines
    (e.g. :data:`SKIP_FLAG_HINT`), for manifest errors."""
    args = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in args:
        os.environ[DEBUG_ENV] = "1"  # seen by nested handlers too (a Hydra job)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return main([a for a in args if a != DEBUG_FLAG])
    except USER_ERRORS as e:
        if debug:
            raise
        sys.stdout.flush()
        print(error_line(e, skip_hint), file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    except KeyboardInterrupt as e:  # Ctrl-C: the runner's message says what was kept and how to resume; a chained
        if debug:  # traceback printed before it buried it
            raise
        sys.stdout.flush()
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None


def hydra_command(config_path: str, config_name: str) -> Callable[[Callable[[DictConfig], T]], Callable[..., T]]:
    """NeMo's ``hydra_runner`` with the user's errors as one line, exit code 2: Hydra's own (bad overrides,
    unknown config options; ``HYDRA_FULL_ERROR=1`` makes Hydra re-raise them instead of printing them) and
    the task's (data, config values), which end the job with ``SystemExit``, the one exception Hydra
    passes on without printing "Error executing job ..." first."""

    def decorator(task: Callable[[DictConfig], T]) -> Callable[..., T]:
        @functools.wraps(task)  # Hydra unwraps this to find the script, which config_path is relative to
        def job(cfg: DictConfig) -> T:
            return run_cli(lambda _: task(cfg), [], skip_hint=SKIP_CONFIG_HINT)

        hydra_main = hydra_runner(config_path=config_path, config_name=config_name)(job)

        @functools.wraps(task)
        def main(cfg_passthrough: DictConfig | None = None) -> T:
            def call(args: list[str]) -> T:
                sys.argv[1:] = args  # Hydra reads the command line itself
                os.environ["HYDRA_FULL_ERROR"] = "1"
                return hydra_main(cfg_passthrough)

            return run_cli(call)

        return main

    return decorator


def error_line(error: BaseException, skip_hint: str | None = None) -> str:
    """``error: <what> — <what to do>`` on one line."""
    fix = getattr(error, "fix", None)
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key
        what, fix = f"config: {key} has no value", f"set it on the command line: {override_name(key)}=..."
    elif isinstance(error, OSError) and error.filename:  # open() and friends: "[Errno 2] ..." otherwise
        what = f"{error.filename}: {error.strerror}"
    elif isinstance(error, HydraException):  # the search path it appends is Hydra's, not the user's
        what = str(error).split("Config search path")[0]
    else:
        what = str(error)
    if isinstance(error, ManifestError) and not fix:
        fix = f"fix the line, or {skip_hint} to skip and count such lines" if skip_hint else "fix the line"
    if isinstance(error, UnsafeTargetError):
        fix = "name a class of nemo_speechlm or NeMo in the config"
    line = " ".join(f"error: {what}".split())  # one line, whatever the message's own line breaks
    return f"{line} — {fix}" if fix else line


def override_name(key: str) -> str:
    """An OmegaConf key as a Hydra override spells it: ``a.b[0].c`` -> ``a.b.0.c``."""
    return key.replace("[", ".").replace("]", "")
