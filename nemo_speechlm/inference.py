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

The helpers here (:func:`load_model`, :func:`answer_items`, :func:`item_keys`,
:func:`check_run_settings`) are shared with :mod:`nemo_speechlm.evaluation.standard`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from nemo_speechlm.data.audio import AudioError, check_audio_length, read_audio
from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary, read_manifest
from nemo_speechlm.errors import InputError
from nemo_speechlm.generation.behaviors import utterance_id
from nemo_speechlm.generation.runner import RunSummary, run_resumable
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.checkpoint import restore_checked
from nemo_speechlm.parts.cli import SKIP_FLAG_HINT, CommandParser, UsageError, run_cli

SETTINGS_SUFFIX = ".settings.json"


# --------------------------------------------------------------------------- model


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine", "use --device cpu")
    return resolved


def load_model(path: str | Path, device: str = "auto", bf16: bool = False) -> SpeechLMModel:
    """Restore a ``.nemo`` for inference (eval mode, no gradients needed).

    ``bf16`` casts only the LLM (most of the weights) to bfloat16 and needs CUDA; the
    preprocessor and encoder stay fp32 (mel features in bf16 are not supported), and the
    adapter's fp32 output is cast where it is spliced into the LLM's embeddings. A file that is not
    a ``.nemo`` of ours raises :class:`~nemo_speechlm.parts.checkpoint.CheckpointError` saying what it is.
    """
    target = resolve_device(device)
    if bf16 and target.type != "cuda":
        raise InputError("bf16 inference needs a CUDA device (on CPU, bf16 is slower than fp32)", "drop --bf16")
    model = restore_checked(SpeechLMModel, path, map_location=target)
    model = model.to(target).eval()
    if bf16:
        model.llm.to(torch.bfloat16)
    return model


def model_id(path: str | Path) -> str:
    """Identity of a model file for resuming: its absolute path and modification time, so that
    predictions of a retrained model written to the same path are not mixed with old ones."""
    path = Path(path).resolve()
    if not path.exists():
        return str(path)
    return f"{path} (modified {datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec='seconds')})"


def generation_kwargs(
    max_new_tokens: int | None = None, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0
) -> dict:
    """Hugging Face ``generate`` settings: greedy by default; ``None`` keeps the model's length cap."""
    kwargs: dict = {"do_sample": bool(sample)}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    return kwargs


# --------------------------------------------------------------------------- prompts and audio


def ensure_audio_locator(prompt: str, tag: str) -> tuple[str, bool]:
    """The prompt with the audio locator appended on a new line when it has none; also says
    whether it was appended (so the caller can tell the user once)."""
    if tag in prompt:
        return prompt, False
    return f"{prompt}\n{tag}", True


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


def item_keys(entries: Sequence[ManifestEntry], prompts: Sequence[str]) -> list[str]:
    """A stable, unique key per (line, prompt) for resuming.

    A line's own ``key`` field is used when it has one (e.g. a behaviors file); otherwise the
    key is the audio and offset plus a digest of the prompt, so a changed prompt is a new
    item, and repeated identical lines get ``#2``, ``#3``...
    """
    keys, seen = [], Counter()
    for entry, prompt in zip(entries, prompts):
        if isinstance(entry.get("key"), (str, int)) and not isinstance(entry.get("key"), bool):
            keys.append(entry["key"])
            continue
        key = f"{utterance_id(entry)}|{hashlib.sha1(prompt.encode()).hexdigest()[:10]}"
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def check_run_settings(output_path: str | Path, settings: dict) -> None:
    """Refuse to resume into an output written with other settings (model, prompt, decoding):
    the old predictions would be silently mixed with new ones. Writes ``<output>.settings.json``."""
    path = Path(str(output_path) + SETTINGS_SUFFIX)
    settings = json.loads(json.dumps(settings))  # normalize tuples etc. for the comparison
    if path.is_file() and Path(output_path).is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            diff = "; ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise InputError(
                f"{output_path} holds predictions made with other settings ({diff})",
                f"use another output location, or delete {output_path} and {path} to start over",
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_records(path: str | Path, keys: Sequence) -> list[dict]:
    """The output records for ``keys``, in that order (a predictions file may hold them in any order)."""
    by_key = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_key[record["key"]] = record
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise InputError(f"{path}: no prediction for {len(missing)} items (e.g. {missing[0]!r})", "rerun to complete it")
    return [by_key[k] for k in keys]


# --------------------------------------------------------------------------- batched answering


def answer_items(
    model: SpeechLMModel,
    items: list[dict],
    output_path: str | Path,
    make_record: Callable[[dict, str], dict],
    batch_size: int = 8,
    system_prompt: str | None = None,
    desc: str = "Answering",
    **generation: object,
) -> RunSummary:
    """Answer ``{"key", "entry", "prompt"}`` items about their audio through the resumable runner.

    ``make_record(item, answer)`` builds the output line (it must carry ``item["key"]``), so
    inference and every evaluation share one batched, resumable loop.
    """

    def process(batch: list[dict]) -> list[dict]:
        audios = [load_entry_audio(item["entry"], model.sampling_rate, model.encoder_frame_duration) for item in batch]
        answers = model.respond(audios, [item["prompt"] for item in batch], batch_size=len(batch),
                                system_prompt=system_prompt, **generation)
        return [make_record(item, a) for item, a in zip(batch, answers)]

    return run_resumable(items, process, output_path, batch_size=batch_size, desc=desc, key="key")


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
    check_run_settings(output, {"model": model_name, "manifest": str(Path(manifest).resolve()), "prompt": prompt,
                                "prompt_field": prompt_field, "system_prompt": system_prompt, "generation": generation})

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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="length cap (default: the model's max_new_tokens)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --sample")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --sample")
    parser.add_argument("--system-prompt", default=None)
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
    for name in ("batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
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
