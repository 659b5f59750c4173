"""Standard evaluations of a speech LLM: ASR (WER/CER), AST (BLEU/chrF), spoken QA
(ROUGE-L/exact match) and text retention (does the model still answer text like its base LLM?).

Each evaluation answers its input through the shared resumable runner, writing
``<out_dir>/<mode>_predictions.jsonl`` (one line per item, with its own scores; rerun the same
command to resume an interrupted run), then scores the whole file into
``<out_dir>/<mode>_metrics.json``. Scoring is a pure function of references and predictions
(:func:`score_asr`, :func:`score_ast`, :func:`score_sqa`, :func:`score_agreement`), so it can
be checked, or rerun, without a model.

Command line (through ``examples/evaluate.py``)::

    python examples/evaluate.py asr --model m.nemo --manifest test.jsonl --out-dir eval/
    python examples/evaluate.py ast --model m.nemo --manifest covost_en_de.jsonl --out-dir eval/
    python examples/evaluate.py sqa --model m.nemo --manifest sqa.jsonl --out-dir eval/
    python examples/evaluate.py text-retention --model m.nemo --conversations chat.jsonl --out-dir eval/
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nemo_speechlm.data.joint_sft import AST_TASKS, ASR_TASKS, LANGUAGES, PNC_VALUES, canary_instruction
from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary, read_manifest
from nemo_speechlm.data.text_sft import read_text_sft
from nemo_speechlm.errors import InputError
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.models.answering import (SYSTEM_PROMPT_HELP, answer_items, ensure_audio_locator,
                                             generation_kwargs, item_keys)
from nemo_speechlm.models.base_llm import base_llm, base_llm_description
from nemo_speechlm.models.loading import DTYPE_DEFAULT, llm_dtype, load_model, model_id, model_identity
from nemo_speechlm.parts.cli import positive_int
from nemo_speechlm.parts.metrics import (
    bleu,
    char_error_rate,
    check_bleu_tokenizer,
    chrf,
    exact_match,
    primary_language,
    rouge_l,
    sentence_bleu,
    sentence_chrf,
    utterance_wer,
    word_error_rate,
)
from nemo_speechlm.parts.prompting import encode_messages
from nemo_speechlm.parts.runner import check_run_settings, read_records, run_resumable, update_records

MODES = ("asr", "ast", "sqa", "text-retention")


# --------------------------------------------------------------------------- prompts


def canary_prompt(source_lang: str, target_lang: str, pnc: bool) -> str:
    """Canary/VoiceTextBlender-style instruction: "Translate the English content to German,
    ignoring punctuations and capitalizations." (or "Transcribe the content to English, ..."); the
    languages and wording are the training data's (:mod:`nemo_speechlm.data.joint_sft`)."""
    _language(source_lang), _language(target_lang)  # an unknown code fails here, saying which
    task = ASR_TASKS[0] if source_lang == target_lang else AST_TASKS[0]
    return canary_instruction(task, source_lang, target_lang, pnc)


def _language(code: str) -> str:
    if code not in LANGUAGES:
        raise InputError(f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGES))} (or pass --prompt)")
    return LANGUAGES[code]


def line_instruction(entry: ManifestEntry, require_target: bool) -> str:
    """The Canary-style instruction for a manifest line from its ``source_lang``, ``target_lang``
    and ``pnc`` fields (source defaults to English; ASR lines may omit the target; ``pnc`` defaults to yes,
    as in training, so a line is asked what the model was trained to answer for it)."""
    source = entry.get("source_lang") or "en"
    target = entry.get("target_lang")
    if not target:
        if require_target:
            raise ManifestError(entry.path, entry.line, "missing: a translation line needs the target language "
                                f"code ({', '.join(sorted(LANGUAGES))}), or pass --prompt", "target_lang")
        target = source
    pnc = _pnc(entry)
    try:
        return canary_prompt(str(source), str(target), pnc)
    except ValueError as e:
        field = "source_lang" if str(source) not in LANGUAGES else "target_lang"
        raise ManifestError(entry.path, entry.line, str(e), field) from None


def _pnc(entry: ManifestEntry) -> bool:
    value = entry.get("pnc")
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() not in PNC_VALUES:
        raise ManifestError(entry.path, entry.line, f"expected yes/no (or true/false), got {value!r}", "pnc")
    return PNC_VALUES[str(value).strip().lower()]


# --------------------------------------------------------------------------- scoring (pure)


def score_asr(references: Sequence[str], predictions: Sequence[str], normalize: bool = True,
              languages: Sequence[str | None] | None = None) -> dict:
    """Corpus WER and CER (with error counts) over all utterances, each normalized for its language (``languages``:
    the lines' ``source_lang``; English where not given) and, in unspaced languages (zh, ja, ...), counted by
    character (``parts.metrics.normalize_for_language``)."""
    words = word_error_rate(references, predictions, normalize=normalize, languages=languages)
    chars = char_error_rate(references, predictions, normalize=normalize, languages=languages)
    english = all(primary_language(lang) in ("", "en") for lang in languages or [])
    return {
        "wer": words["wer"],
        "cer": chars["cer"],
        "num_utterances": len(references),
        "word_errors": {k: v for k, v in words.items() if k != "wer"},
        "char_errors": {k: v for k, v in chars.items() if k != "cer"},
        "normalization": ("none" if not normalize else "whisper_english" if english
                          else "whisper_english for English, whisper_basic for other languages"),
    }


def score_ast(references: Sequence[str], predictions: Sequence[str],
              target_langs: str | Sequence[str | None] | None = None) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults, 0-100; BLEU tokenized for each target language: zh, ja, ko take
    sacrebleu's zh / ja-mecab / ko-mecab tokenizers, ``parts.metrics.BLEU_TOKENIZERS``)."""
    return {"bleu": bleu(references, predictions, target_langs), "chrf": chrf(references, predictions),
            "num_utterances": len(references)}


def score_sqa(references: Sequence[str], predictions: Sequence[str]) -> dict:
    """Mean ROUGE-L F-measure and exact-match rate (after English normalization)."""
    _check_lengths(references, predictions)
    return {
        "rouge_l": sum(rouge_l(r, p) for r, p in zip(references, predictions)) / len(references),
        "exact_match": sum(exact_match(r, p) for r, p in zip(references, predictions)) / len(references),
        "num_items": len(references),
    }


def score_agreement(base_answers: Sequence[str], trained_answers: Sequence[str]) -> dict:
    """How close the trained model's text answers stay to the base LLM's: mean ROUGE-L and the
    share of answers that are identical (exact match without normalization)."""
    _check_lengths(base_answers, trained_answers)
    n = len(base_answers)
    return {
        "agreement_rouge_l": sum(_agreement_rouge(b, t) for b, t in zip(base_answers, trained_answers)) / n,
        "agreement_exact_match": sum(b.strip() == t.strip() for b, t in zip(base_answers, trained_answers)) / n,
        "num_conversations": n,
    }


def _agreement_rouge(base: str, trained: str) -> float:
    # Two identical answers agree fully, even when neither has a word for ROUGE to count.
    return 1.0 if base.strip() == trained.strip() else rouge_l(base, trained)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same, non-zero number of references and predictions; got {len(a)} and {len(b)}")


# --------------------------------------------------------------------------- speech evaluations


def evaluate_asr(
    model: SpeechLMModel,
    manifest: str | Path,
    out_dir: str | Path,
    prompt: str | None = None,
    batch_size: int = 8,
    reference_field: str = "text",
    normalize: bool = True,
    skip_invalid: bool = False,
    system_prompt: str | None = None,
    model_name: str | None = None,
    **generation,
) -> dict:
    """WER and CER of the model's transcripts against ``reference_field``.

    Default prompt: "Transcribe the content to English, with punctuations and
    capitalizations." (from the line's ``source_lang``/``pnc`` when present), then the audio.
    """

    def prompt_for(entry: ManifestEntry) -> str:
        if entry.get("source_lang") is not None and not isinstance(entry["source_lang"], str):
            raise ManifestError(entry.path, entry.line, f"expected a language code, got {entry['source_lang']!r}",
                                "source_lang")
        return prompt if prompt is not None else line_instruction(entry, require_target=False)

    def record(item: dict, answer: str) -> dict:
        ref, lang = item["entry"][reference_field], item["entry"].get("source_lang")
        wer = utterance_wer(ref, answer, normalize, lang)  # inf for a reference that normalizes to nothing ("Hmm.")
        return {**_base_record(item), **({"source_lang": lang} if lang else {}), "reference": ref, "prediction": answer,
                "wer": wer if math.isfinite(wer) else None}  # (json wrote Infinity, which strict JSON readers reject)

    def score(records: list[dict]) -> dict:
        def scored(rs: list[dict]) -> dict:
            return score_asr([r["reference"] for r in rs], [r["prediction"] for r in rs], normalize,
                             [r.get("source_lang") for r in rs])

        metrics = scored(records)
        by_lang = defaultdict(list)
        for r in records:
            by_lang[primary_language(r.get("source_lang")) or "en"].append(r)
        if len(by_lang) > 1:
            metrics["by_source_lang"] = {lang: scored(rs) for lang, rs in sorted(by_lang.items())}
        return metrics

    task = _ManifestTask("asr", prompt_for, record, score, (reference_field,), prompt)
    return _evaluate_manifest(task, model, manifest, out_dir, batch_size, skip_invalid, system_prompt, model_name, generation)


def evaluate_ast(
    model: SpeechLMModel,
    manifest: str | Path,
    out_dir: str | Path,
    prompt: str | None = None,
    batch_size: int = 8,
    reference_field: str = "answer",
    skip_invalid: bool = False,
    system_prompt: str | None = None,
    model_name: str | None = None,
    **generation,
) -> dict:
    """BLEU and chrF of the model's translations against ``reference_field``, overall and per
    target language. Default prompt per line from ``source_lang`` (default en), ``target_lang``
    (required) and ``pnc`` (default yes, as the training data reads it; until 2026-12-07 no, so a line
    without ``pnc`` was asked otherwise than in training), e.g. "Translate the English content to German,
    with punctuations and capitalizations."."""

    def prompt_for(entry: ManifestEntry) -> str:
        if entry.get("target_lang") is not None and not isinstance(entry["target_lang"], str):
            raise ManifestError(entry.path, entry.line, f"expected a language code, got {entry['target_lang']!r}",
                                "target_lang")
        check_bleu_tokenizer(entry.get("target_lang"))  # while reading the lines: a missing tokenizer stops no answering
        return prompt if prompt is not None else line_instruction(entry, require_target=True)

    def record(item: dict, answer: str) -> dict:
        ref, lang = item["entry"][reference_field], item["entry"].get("target_lang")
        return {**_base_record(item), "target_lang": lang, "reference": ref, "prediction": answer,
                "bleu": sentence_bleu(ref, answer, lang), "chrf": sentence_chrf(ref, answer)}

    def score(records: list[dict]) -> dict:
        def scored(rs: list[dict]) -> dict:
            return score_ast([r["reference"] for r in rs], [r["prediction"] for r in rs], [r.get("target_lang") for r in rs])

        metrics = scored(records)
        by_lang = defaultdict(list)
        for r in records:
            by_lang[r.get("target_lang") or "unknown"].append(r)
        if len(by_lang) > 1:
            metrics["by_target_lang"] = {lang: scored(rs) for lang, rs in sorted(by_lang.items())}
        return metrics

    task = _ManifestTask("ast", prompt_for, record, score, (reference_field,), prompt)
    return _evaluate_manifest(task, model, manifest, out_dir, batch_size, skip_invalid, system_prompt, model_name, generation)


def evaluate_sqa(
    model: SpeechLMModel,
    manifest: str | Path,
    out_dir: str | Path,
    prompt: str | None = None,
    batch_size: int = 8,
    reference_field: str = "answer",
    question_field: str = "question",
    skip_invalid: bool = False,
    system_prompt: str | None = None,
    model_name: str | None = None,
    **generation,
) -> dict:
    """ROUGE-L and exact match of answers to spoken-content questions.

    The prompt is the line's question, then the audio on a new line; ``prompt`` is a template
    in which ``{question}`` is replaced by it (e.g. ``"{question} Answer briefly."``).
    """
    template = prompt if prompt is not None else "{question}"
    if "{question}" not in template:  # right for questions spoken in the audio; a slip otherwise, so say it
        print(f"note: the SQA prompt {template!r} has no {{question}}: every line is asked it without its question "
              '(put {question} where it goes, e.g. "{question} Answer briefly.", unless the audio asks it)',
              file=sys.stderr, flush=True)

    def prompt_for(entry: ManifestEntry) -> str:
        return template.replace("{question}", entry[question_field])

    def record(item: dict, answer: str) -> dict:
        ref = item["entry"][reference_field]
        return {**_base_record(item), "question": item["entry"][question_field], "reference": ref, "prediction": answer,
                "rouge_l": rouge_l(ref, answer), "exact_match": exact_match(ref, answer)}

    def score(records: list[dict]) -> dict:
        return score_sqa([r["reference"] for r in records], [r["prediction"] for r in records])

    task = _ManifestTask("sqa", prompt_for, record, score, (reference_field, question_field), template)
    return _evaluate_manifest(task, model, manifest, out_dir, batch_size, skip_invalid, system_prompt, model_name, generation)


def _base_record(item: dict) -> dict:
    entry = item["entry"]
    out = {"key": item["key"], "line": entry.line, "audio_filepath": entry["audio_filepath"]}
    for name in ("offset", "duration"):
        if entry.get(name) is not None:
            out[name] = entry[name]
    return {**out, "prompt": item["prompt"]}


@dataclass(frozen=True)
class _ManifestTask:
    """What differs between the speech evaluations: the prompt per line, the output line, the scores."""

    mode: str
    prompt_for: Callable[[ManifestEntry], str]
    make_record: Callable[[dict, str], dict]
    score: Callable[[list[dict]], dict]
    required_fields: tuple[str, ...]
    prompt_setting: str | None  # what the user asked for, recorded to refuse resuming with another prompt


def _evaluate_manifest(
    task: _ManifestTask,
    model: SpeechLMModel,
    manifest: str | Path,
    out_dir: str | Path,
    batch_size: int,
    skip_invalid: bool,
    system_prompt: str | None,
    model_name: str | None,
    generation: dict,
) -> dict:
    """Shared flow: read and validate lines, build prompts, answer (resumably), score the file."""
    skipped = SkipSummary()
    items = _manifest_items(model, manifest, task.prompt_for, task.required_fields, skip_invalid, skipped)
    if not items:
        raise InputError(f"{manifest}: no usable lines to evaluate ({skipped})")
    predictions, metrics_path = _output_paths(out_dir, task.mode)
    model_name = model_identity(model, model_name)
    check_run_settings(predictions, {"mode": task.mode, "model": model_name, "manifest": str(Path(manifest).resolve()),
                                     "prompt": task.prompt_setting, "system_prompt": model.system_prompt_for(system_prompt),
                                     "generation": generation,
                                     "llm_dtype": llm_dtype(model)}, defaults=DTYPE_DEFAULT)
    answer_items(model, items, predictions, task.make_record, batch_size, system_prompt, desc=f"Evaluating {task.mode}",
                 exclusive=False, **generation)
    records = _rescored(predictions, items, lambda item, record: task.make_record(item, record["prediction"]))
    metrics = {"mode": task.mode, **task.score(records), "skipped_lines": skipped.total,
               "skipped_by_field": dict(skipped.counts), "model": model_name, "manifest": str(manifest),
               "predictions": str(predictions)}
    return _write_metrics(metrics_path, metrics)


def _manifest_items(model, manifest, prompt_for, required, skip_invalid, skipped) -> list[dict]:
    """The valid lines and their prompts (one audio locator each; clips shorter than one encoder frame are bad
    lines, as in inference: they failed mid-run, after answers were written, ``--skip-invalid`` or not)."""
    pairs, tag = [], model.audio_locator_tag
    for entry in read_manifest(manifest, required_text_fields=required, skip_invalid=skip_invalid, summary=skipped,
                               min_duration=model.encoder_frame_duration):
        try:
            text, _ = ensure_audio_locator(prompt_for(entry), tag)
            if text.count(tag) != 1:  # (a template or question holding the tag): was a traceback from respond()
                raise ManifestError(entry.path, entry.line, f"the prompt has {text.count(tag)} audio locators {tag!r} "
                                    f"but the line has one audio: {text!r}", "prompt")
        except ManifestError as e:
            if not skip_invalid:
                raise
            skipped.add(e)
            continue
        pairs.append((entry, text))
    keys = item_keys([e for e, _ in pairs], [p for _, p in pairs])
    return [{"key": k, "entry": e, "prompt": p} for k, (e, p) in zip(keys, pairs)]


def _rescored(predictions: Path, items: list[dict], rescore: Callable[[dict, dict], dict]) -> list[dict]:
    """The items' records, each rescored from its cached answer against the input as it is now (``rescore(item,
    record)``), the file updated where that changed one. Answers are resumed by audio and prompt, so a corrected
    reference, another ``reference_field`` or ``normalize`` used to keep the first run's references and scores."""
    by_key = {item["key"]: item for item in items}
    update_records(predictions, lambda record: rescore(by_key[record["key"]], record) if record["key"] in by_key else record,
                   why="rescored against the input's current references and scoring settings")
    return read_records(predictions, list(by_key))


def _output_paths(out_dir: str | Path, mode: str) -> tuple[Path, Path]:
    stem = mode.replace("-", "_")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{stem}_predictions.jsonl", out_dir / f"{stem}_metrics.json"


def _write_metrics(path: Path, metrics: dict) -> dict:
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics


# --------------------------------------------------------------------------- text retention


def read_conversations(path: str | Path) -> list[dict]:
    """Text-only conversations as ``{"line", "messages", "reference"}``: ``messages`` end with
    the last user turn (earlier turns and a system prompt are kept as context), ``reference``
    is the assistant turn that followed it in the file, if any.

    Any format ``examples/prepare_text_sft.py`` accepts (ours / ShareGPT ``conversations``,
    OpenAI ``messages``, Alpaca), read by the same code.
    """
    out = []
    for line_no, conversation in read_text_sft(path, require_answer=False):
        system = [{"role": "system", "content": conversation["system"]}] if conversation.get("system") else []
        messages = system + [{"role": t["from"].lower(), "content": t["value"]} for t in conversation["conversations"]]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        answer = messages[last_user + 1]["content"] if last_user + 1 < len(messages) else None
        out.append({"line": line_no, "messages": messages[: last_user + 1], "reference": answer})
    if not out:
        raise InputError(f"{path}: no conversations")
    return out


def respond_to_messages(
    model: SpeechLMModel, conversations: Sequence[list[dict]], batch_size: int = 8, **generation
) -> list[str]:
    """Text-only answers to whole chat histories (``respond`` takes one user turn; text
    retention needs the earlier turns as context)."""
    ids = [encode_messages(model.prompt_formatter, msgs)["context_ids"] for msgs in conversations]
    return model.complete(ids, batch_size=batch_size, **generation)


def evaluate_text_retention(
    model: SpeechLMModel,
    conversations: str | Path,
    out_dir: str | Path,
    batch_size: int = 8,
    model_name: str | None = None,
    **generation,
) -> dict:
    """VoiceTextBlender's forgetting check: answer text-only conversations with the trained model
    and with its base LLM, and report how much the answers agree (ROUGE-L, exact match); also
    ROUGE-L of each against the file's own assistant answers when it has them."""
    convs = read_conversations(conversations)
    for conv in convs:
        _require_text_only(conversations, conv, model.audio_locator_tag)
    keys = _conversation_keys(convs)
    items = [{"key": k, **conv} for k, conv in zip(keys, convs)]
    predictions, metrics_path = _output_paths(out_dir, "text-retention")
    model_name = model_identity(model, model_name)
    check_run_settings(predictions, {"mode": "text-retention", "model": model_name,
                                     "conversations": str(Path(conversations).resolve()), "generation": generation,
                                     "llm_dtype": llm_dtype(model)}, defaults=DTYPE_DEFAULT)

    def process(batch: list[dict]) -> list[dict]:
        msgs = [item["messages"] for item in batch]
        trained = respond_to_messages(model, msgs, len(batch), **generation)
        with base_llm(model):
            base = respond_to_messages(model, msgs, len(batch), **generation)
        return [_retention_record(item, b, t) for item, b, t in zip(batch, base, trained)]

    run_resumable(items, process, predictions, batch_size=batch_size, desc="Evaluating text retention", key="key",
                  exclusive=False)
    records = _rescored(predictions, items, lambda item, record: {**record, "reference": item["reference"]})
    metrics = {"mode": "text-retention", **score_agreement([r["base"] for r in records], [r["trained"] for r in records])}
    with_ref = [r for r in records if r.get("reference")]
    if with_ref:
        metrics["num_with_reference"] = len(with_ref)
        metrics["trained_vs_reference_rouge_l"] = sum(rouge_l(r["reference"], r["trained"]) for r in with_ref) / len(with_ref)
        metrics["base_vs_reference_rouge_l"] = sum(rouge_l(r["reference"], r["base"]) for r in with_ref) / len(with_ref)
    metrics.update(base_llm=base_llm_description(model), model=model_name, conversations=str(conversations),
                   predictions=str(predictions))
    return _write_metrics(metrics_path, metrics)


def _require_text_only(path, conv: dict, tag: str) -> None:
    if any(tag in m["content"] for m in conv["messages"]):
        raise ManifestError(path, conv["line"], f"contains the audio locator {tag!r}; text retention needs text-only conversations")


def _conversation_keys(convs: list[dict]) -> list[str]:
    keys, seen = [], Counter()
    for conv in convs:
        key = hashlib.sha1(json.dumps(conv["messages"], sort_keys=True).encode()).hexdigest()[:16]
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def _retention_record(item: dict, base: str, trained: str) -> dict:
    return {
        "key": item["key"], "line": item["line"], "context": item["messages"][:-1], "prompt": item["messages"][-1]["content"],
        "reference": item["reference"], "base": base, "trained": trained,
        "rouge_l": _agreement_rouge(base, trained), "exact_match": base.strip() == trained.strip(),
    }


# --------------------------------------------------------------------------- CLI


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``asr``, ``ast``, ``sqa`` and ``text-retention`` subcommands."""
    helps = {
        "asr": "speech recognition: WER and CER (normalized) against the manifest's transcripts",
        "ast": "speech translation: BLEU and chrF (sacrebleu) against the manifest's translations",
        "sqa": "spoken question answering: ROUGE-L and exact match against the manifest's answers",
        "text-retention": "text-only conversations: agreement of the trained model with its base LLM",
    }
    for mode in MODES:
        p = subparsers.add_parser(mode, help=helps[mode], description=helps[mode])
        p.add_argument("--model", required=True, help="speech LLM .nemo checkpoint")
        if mode == "text-retention":
            p.add_argument("--conversations", required=True, help="JSONL with 'messages' [{role, content}] or "
                           "'conversations' [{from, value}]; the last user turn is answered")
        else:
            p.add_argument("--manifest", required=True, help="NeMo manifest JSONL")
            p.add_argument("--reference-field", default="text" if mode == "asr" else "answer",
                           help="manifest field holding the reference")
            p.add_argument("--skip-invalid", action="store_true", help="skip bad lines (e.g. missing audio) and count them")
            p.add_argument("--prompt", default=None, help=_PROMPT_HELP[mode])
            p.add_argument("--system-prompt", default=None, help=SYSTEM_PROMPT_HELP)
        if mode == "asr":
            p.add_argument("--no-normalize", action="store_true", help="score raw text (default: Whisper's English normalizer)")
        p.add_argument("--out-dir", required=True, help="writes <mode>_predictions.jsonl and <mode>_metrics.json here")
        p.add_argument("--batch-size", type=positive_int, default=8)
        p.add_argument("--max-new-tokens", type=positive_int, default=None, help="length cap (default: the model's max_new_tokens)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        p.add_argument("--bf16", action="store_true", help="run the LLM in bfloat16 (CUDA only)")


_PROMPT_HELP = {
    "asr": "instruction for every line (default: 'Transcribe the content to English, with punctuations and "
           "capitalizations.'); the audio goes at the locator, or after it on a new line",
    "ast": "instruction for every line (default: built from source_lang/target_lang/pnc, e.g. 'Translate the English "
           "content to German, with punctuations and capitalizations.'; pnc defaults to yes, as in training)",
    "sqa": "template with {question} (default: '{question}'); the audio goes after it on a new line",
}


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation ``args.mode`` and print its metrics and output files."""
    model = load_model(args.model, args.device, args.bf16)
    gen = generation_kwargs(args.max_new_tokens)
    common = {"batch_size": args.batch_size, "model_name": model_id(args.model), **gen}
    if args.mode == "text-retention":
        metrics = evaluate_text_retention(model, args.conversations, args.out_dir, **common)
    else:
        evaluate = {"asr": evaluate_asr, "ast": evaluate_ast, "sqa": evaluate_sqa}[args.mode]
        extra = {"normalize": not args.no_normalize} if args.mode == "asr" else {}
        metrics = evaluate(model, args.manifest, args.out_dir, prompt=args.prompt, reference_field=args.reference_field,
                           skip_invalid=args.skip_invalid, system_prompt=args.system_prompt, **extra, **common)
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    stem = args.mode.replace("-", "_")
    print(f"Predictions: {Path(args.out_dir) / f'{stem}_predictions.jsonl'}")
    print(f"Metrics: {Path(args.out_dir) / f'{stem}_metrics.json'}")
    return metrics
