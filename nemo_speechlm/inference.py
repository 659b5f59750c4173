"""Answer prompts about audio with a trained speech LLM ``.nemo``: Python helpers and the
``speechlm-infer`` command (also ``examples/infer.py``).

    speechlm-infer model.nemo a.wav b.wav --prompt "Transcribe the audio."
    speechlm-infer model.nemo --manifest test.jsonl --output answers.jsonl --prompt-field question

Options and files may come in any order. Single mode prints one answer per audio on stdout, in
order (an answer may span several lines; add ``--jsonl`` for one JSON object per audio). Manifest mode writes one JSON line per
manifest line: the line's fields plus ``key``, ``prompt`` and ``answer``; it resumes an
interrupted run and shows a progress bar. A prompt without the model's audio locator
(``<|audio|>`` by default) gets it appended on a new line. Decoding is greedy unless
``--sample`` is given. Audio longer than the encoder's window (Whisper: 30 s) is encoded in chunks.
A bad file or argument ends the command with one line on stderr and exit code 2 (``--debug``
shows the traceback).

The helpers it shares with the evaluations live below it: :func:`~nemo_speechlm.models.loading.load_model`,
:mod:`nemo_speechlm.models.answering` (:func:`answer_items`, :func:`item_keys`) and
:func:`~nemo_speechlm.parts.runner.check_run_settings`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from nemo_speechlm.data.audio import load_entry_audio  # noqa: F401  (kept importable here)
from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary, read_manifest
from nemo_speechlm.errors import AudioError, InputError  # noqa: F401  (AudioError kept importable here)
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.models.answering import (SYSTEM_PROMPT_HELP, answer_items, ensure_audio_locator,
                                             generation_kwargs, item_keys)
from nemo_speechlm.models.loading import (  # noqa: F401  (resolve_device kept importable here)
    DTYPE_DEFAULT, llm_dtype, load_model, model_id, model_identity, resolve_device,
)
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli, SKIP_FLAG_HINT, UsageError
from nemo_speechlm.parts.runner import RunSummary, check_run_settings, read_records  # noqa: F401


def manifest_prompts(
    entries: Sequence[ManifestEntry], prompt: str | None, prompt_field: str | None, audio_locator_tag: str
) -> Iterator[tuple[ManifestEntry, str]]:
    """(entry, prompt) for each line: the line's ``prompt_field`` if it has one, else ``prompt``.
    Raises :class:`ManifestError` for a line with neither or with more than one audio locator."""
    for entry in entries:
        value = entry.get(prompt_field) if prompt_field else None
        if value is not None and not isinstance(value, str):
            raise ManifestError(entry.path, entry.line, f"prompt must be a string, got {type(value).__name__}", prompt_field)
        if value is None or not value.strip():
            if prompt is None:
                raise ManifestError(entry.path, entry.line, "missing or empty prompt, and no --prompt to fall back on", prompt_field)
            value = prompt
        elif value.count(audio_locator_tag) > 1:
            raise ManifestError(entry.path, entry.line, f"the prompt has {value.count(audio_locator_tag)} audio locators "
                                f"{audio_locator_tag!r} but the line has one audio; keep one", prompt_field)
        yield entry, value


def infer_manifest(
    model: SpeechLMModel,
    manifest: str | Path,
    output: str | Path,
    prompt: str | None = None,
    prompt_field: str | None = None,
    answer_field: str = "answer",
    batch_size: int = 8,
    system_prompt: str | None = None,
    skip_invalid: bool = False,
    skipped: SkipSummary | None = None,
    model_name: str | None = None,
    **generation: object,
) -> RunSummary:
    """Answer every line of a manifest into ``output`` (JSONL: line fields + ``key``, ``prompt``,
    ``answer_field``); reruns resume. Bad lines raise, or are skipped and counted in ``skipped``."""
    if prompt is None and prompt_field is None:
        raise ValueError("Give a prompt for every line, a manifest field holding per-line prompts, or both.")
    tag = model.audio_locator_tag
    if prompt is not None and prompt.count(tag) > 1:
        raise InputError(f"the prompt has {prompt.count(tag)} audio locators {tag!r} but each line has one audio",
                         "keep one locator (or none: the audio then goes after the prompt)")
    skipped = skipped if skipped is not None else SkipSummary()
    entries = list(read_manifest(manifest, required_text_fields=(), skip_invalid=skip_invalid, summary=skipped,
                                 min_duration=model.encoder_frame_duration))
    pairs = _valid_prompts(entries, prompt, prompt_field, tag, skip_invalid, skipped)
    appended = 0
    items = []
    for (entry, text), key in zip(pairs, item_keys([e for e, _ in pairs], [t for _, t in pairs])):
        if answer_field in entry.data:
            raise ManifestError(
                entry.path, entry.line,
                f"the line already has a field {answer_field!r}, which the answer would overwrite; choose another answer field "
                "(--answer-field prediction)", answer_field,
            )
        text, added = ensure_audio_locator(text, tag)
        appended += added
        items.append({"key": key, "entry": entry, "prompt": text})
    if appended:
        _note(f"{appended} prompts have no audio locator {tag!r}: the audio goes after the prompt, on a new line.")
    check_run_settings(output, {"model": model_identity(model, model_name), "manifest": str(Path(manifest).resolve()),
                                "prompt": prompt, "prompt_field": prompt_field,
                                "system_prompt": model.system_prompt_for(system_prompt),
                                "generation": generation, "answer_field": answer_field, "llm_dtype": llm_dtype(model)},
                       defaults={"answer_field": answer_field, **DTYPE_DEFAULT})  # (not recorded before: unknown)

    def record(item: dict, answer: str) -> dict:
        return {**item["entry"].data, "key": item["key"], "prompt": item["prompt"], answer_field: answer}

    return answer_items(model, items, output, record, batch_size, system_prompt, desc="Answering", **generation)


def _valid_prompts(entries, prompt, prompt_field, tag, skip_invalid, skipped) -> list[tuple[ManifestEntry, str]]:
    pairs = []
    for entry in entries:
        try:
            pairs.extend(manifest_prompts([entry], prompt, prompt_field, tag))
        except ManifestError as e:
            if not skip_invalid:
                raise
            skipped.add(e)
    return pairs


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``speechlm-infer`` options (a function so that other scripts can embed them)."""
    parser.add_argument("model", help="speech LLM .nemo checkpoint")
    parser.add_argument("audio", nargs="*", help="audio files to ask about (single mode)")
    parser.add_argument("--prompt", default=None, help="the question or instruction; the audio goes at the locator "
                        "(e.g. <|audio|>), or after the prompt on a new line when it has none")
    parser.add_argument("--manifest", default=None, help="NeMo manifest JSONL to answer line by line (batch mode)")
    parser.add_argument("--output", default=None, help="batch mode: JSONL written line by line; rerunning resumes it")
    parser.add_argument("--prompt-field", default=None, help="batch mode: manifest field with per-line prompts "
                        "(lines without it use --prompt)")
    parser.add_argument("--answer-field", default="answer", help="batch mode: output field for the answer")
    parser.add_argument("--skip-invalid", action="store_true", help="batch mode: skip bad lines (e.g. missing audio) "
                        "and count them instead of stopping")
    parser.add_argument("--jsonl", action="store_true", help="single mode: print one JSON object per audio")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="length cap (default: the model's max_new_tokens)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --sample")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --sample")
    parser.add_argument("--system-prompt", default=None, help=SYSTEM_PROMPT_HELP)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--bf16", action="store_true", help="run the LLM in bfloat16 (CUDA only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``speechlm-infer`` (``argv``: the command line by default); bad input ends it with one line, exit code 2."""
    run_cli(_main, argv, skip_hint=SKIP_FLAG_HINT)


def _main(argv: list[str]) -> None:
    parser = add_arguments(CommandParser(prog="speechlm-infer", description=__doc__))
    args = parser.parse_intermixed_args(argv)  # files after options too: `model.nemo --prompt "..." a.wav`
    _check_arguments(parser, args)
    torch.manual_seed(args.seed)
    gen = generation_kwargs(args.max_new_tokens, args.sample, args.temperature, args.top_p)
    lines = []
    with _stdout_to_stderr():  # NeMo logs INFO on stdout; stdout is for answers only
        model = load_model(args.model, args.device, args.bf16)
        if args.manifest:
            _run_manifest(model, args, gen)
        else:
            lines = _answer_files(model, args, gen)
    for line in lines:
        print(line, flush=True)


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not Path(args.model).is_file():
        raise UsageError(f"model file not found: {args.model}", "check the path")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.manifest:
        if args.audio:
            parser.error("give audio files or --manifest, not both")
        if not args.output:
            parser.error("--manifest needs --output (the JSONL to write)")
        if args.prompt is None and args.prompt_field is None:
            parser.error("--manifest needs --prompt, --prompt-field, or both")
        return
    if not args.audio:
        parser.error("give one or more audio files (or --manifest with --output)")
    if args.prompt is None:
        parser.error("--prompt is required with audio files")
    missing = [a for a in args.audio if not Path(a).is_file()]
    if missing:
        raise UsageError(f"audio file not found: {', '.join(missing)}", "check the path")


def _answer_files(model: SpeechLMModel, args: argparse.Namespace, gen: dict) -> list[str]:
    n_tags = args.prompt.count(model.audio_locator_tag)
    if n_tags > 1:
        raise UsageError(f"--prompt has {n_tags} audio locators {model.audio_locator_tag!r} but each audio file is one "
                         "audio", "keep one locator (or none: the audio then goes after the prompt)")
    prompt, added = ensure_audio_locator(args.prompt, model.audio_locator_tag)
    if added:
        _note(f"the prompt has no audio locator {model.audio_locator_tag!r}: the audio goes after it, on a new line.")
    answers = model.respond(list(args.audio), [prompt] * len(args.audio), batch_size=args.batch_size,
                            system_prompt=args.system_prompt, **gen)
    if args.jsonl:
        return [json.dumps({"audio_filepath": a, "prompt": prompt, "answer": x}, ensure_ascii=False)
                for a, x in zip(args.audio, answers)]
    return answers


def _run_manifest(model: SpeechLMModel, args: argparse.Namespace, gen: dict) -> None:
    skipped = SkipSummary()
    summary = infer_manifest(
        model, args.manifest, args.output, prompt=args.prompt, prompt_field=args.prompt_field,
        answer_field=args.answer_field, batch_size=args.batch_size, system_prompt=args.system_prompt,
        skip_invalid=args.skip_invalid, skipped=skipped, model_name=model_id(args.model), **gen,
    )
    print(summary, file=sys.stderr)
    if skipped.total:
        print(f"Skipped manifest lines: {skipped}", file=sys.stderr)
    print(f"Answers: {args.output}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 (Python and C level) to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    main()
