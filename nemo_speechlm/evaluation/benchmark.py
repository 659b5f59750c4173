"""The MTBI generalization benchmark: does the speech LLM behave on speech the way its LLM
behaves on the transcript, for prompts and tasks it never saw in training?

Items are (held-out utterance x evaluation prompt) for the catalog's three splits
(``seen_task_seen_prompt``, ``seen_task_heldout_prompt``, ``heldout_task``), prompts drawn
per task deterministically from ``seed``. Systems answer every item:

* each speech model (``.nemo``): the prompt with ``{input}`` replaced by the audio locator;
* ``cascade`` (when an ASR model is given): the text LLM on the ASR transcript;
* ``text_upper_bound``: the text LLM (the first model's LLM, LoRA off) on the transcript.
  Its answer is also the *reference* every system is scored against, so it scores
  ROUGE-L 1 by definition; it is reported for its task-following and ground-truth scores.

Scores per answer (``scores`` in ``predictions.jsonl``): ``rouge_l`` (0-1) and ``chrf``
(0-100) against the reference; ``follows_task`` (the task's check from the catalog);
``transcript_copy`` (the answer is just the transcript; a failure unless the line has
``copy_expected``: tasks whose ground truth is the transcript, like repeat, or whose check is
``close_to_input``); and ``gt_wer``/``gt_cer``/``gt_bleu``/``gt_chrf`` against the task's
ground-truth manifest field where the task has one and the line has the field.

Outputs in ``out_dir``: ``references.jsonl`` (cached text-LLM answers), ``asr_transcripts.jsonl``
(cascade only), ``predictions.jsonl``, ``metrics.json``, ``results.md`` and ``splits.png``.
Every answer file is written through :func:`~nemo_speechlm.parts.runner.run_resumable`,
so rerunning the same command continues an interrupted run and recomputes nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nemo_speechlm.data.manifest import ManifestEntry, SkipSummary, read_manifest
from nemo_speechlm.data.task_catalog import EVALUATION_SPLITS, Task, TaskCatalog
from nemo_speechlm.errors import InputError
from nemo_speechlm.parts.metrics import (
    bleu,
    char_error_rate,
    chrf,
    is_transcript_copy,
    rouge_l,
    sentence_bleu,
    sentence_chrf,
    utterance_wer,
    word_error_rate,
)
from nemo_speechlm.data.task_checks import run_check
from nemo_speechlm.data.utterance import utterance_id
from nemo_speechlm.parts.runner import RunSummary, run_resumable

log = logging.getLogger(__name__)

UPPER_BOUND = "text_upper_bound"
CASCADE = "cascade"
TRANSCRIPT_FIELD = "text"
SPLIT_TITLES = {
    "seen_task_seen_prompt": "Seen task, seen prompt",
    "seen_task_heldout_prompt": "Seen task, held-out prompt (prompt generalization)",
    "heldout_task": "Held-out task (task generalization)",
}
CONFIG_FILE = "benchmark_config.json"
_GT_METRICS = ("gt_wer", "gt_cer", "gt_bleu", "gt_chrf")
_GT_LABELS = {"gt_wer": "WER vs ground truth", "gt_cer": "CER vs ground truth",
              "gt_bleu": "BLEU vs ground truth", "gt_chrf": "chrF vs ground truth"}


# --------------------------------------------------------------------------- items


def benchmark_items(
    manifest: str | Path,
    catalog: TaskCatalog,
    splits: Sequence[str] = EVALUATION_SPLITS,
    prompts_per_task: int | None = 2,
    seed: int = 0,
    skipped: SkipSummary | None = None,
) -> list[dict]:
    """One item ``{"key", "utt", "entry", "prompt", "split"}`` per valid utterance x evaluation prompt.

    Bad manifest lines (e.g. missing audio) are skipped and counted in ``skipped``: one
    broken file should not cost a whole benchmark run.
    """
    for split in splits:
        if split not in EVALUATION_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected some of {', '.join(EVALUATION_SPLITS)}")
    prompts = [(split, p) for split in splits for p in catalog.evaluation_prompts(split, prompts_per_task, seed)]
    items = []
    for entry in read_manifest(manifest, skip_invalid=True, summary=skipped):
        utt = utterance_id(entry)
        for split, prompt in prompts:
            items.append({"key": f"{utt}|{prompt.id}", "utt": utt, "entry": entry, "prompt": prompt, "split": split})
    return items


# --------------------------------------------------------------------------- scores


def copy_expected(task: Task) -> bool:
    """Whether answering with the transcript is right for this task (repeat, fix the grammar)."""
    gt_is_transcript = task.ground_truth is not None and task.ground_truth.field == TRANSCRIPT_FIELD
    return gt_is_transcript or task.check.get("name") == "close_to_input"


def ground_truth_of(task: Task, entry: ManifestEntry | dict) -> str | None:
    """The manifest's ground-truth text for this task, or None when the task or the line has none."""
    if task.ground_truth is None:
        return None
    value = entry.get(task.ground_truth.field)
    return value if isinstance(value, str) and value.strip() else None


def score_answer(task: Task, prediction: str, reference: str, transcript: str, ground_truth: str | None) -> dict:
    """All per-item scores of one answer (see the module docstring for their meaning)."""
    scores = {
        "rouge_l": rouge_l(reference, prediction),
        "chrf": sentence_chrf(reference, prediction),
        "follows_task": run_check(task.check, prediction, transcript),
        "transcript_copy": is_transcript_copy(prediction, transcript),
    }
    if ground_truth is not None:
        metric = task.ground_truth.metric
        if metric == "wer":
            scores["gt_wer"] = utterance_wer(ground_truth, prediction)
        elif metric == "cer":
            scores["gt_cer"] = char_error_rate([ground_truth], [prediction])["cer"]
        elif metric == "bleu":
            scores["gt_bleu"] = sentence_bleu(ground_truth, prediction)
        elif metric == "chrf":
            scores["gt_chrf"] = sentence_chrf(ground_truth, prediction)
    return scores


# --------------------------------------------------------------------------- systems


class _LazyModel:
    """Load a model only when a job first needs it, so a fully cached rerun loads nothing."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load, self._model = load, None

    def get(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model

    def release(self) -> None:
        self._model = None
        gc.collect()


def _load_speech_model(path: str, device: str):
    import torch

    from nemo_speechlm.models import SpeechLMModel
    from nemo_speechlm.parts.checkpoint import restore_checked

    model = restore_checked(SpeechLMModel, path, map_location=torch.device(device))
    return model.to(device).eval()


def _load_asr_model(name_or_path: str, device: str):
    import torch
    from nemo.collections.asr.models import ASRModel

    if name_or_path.endswith(".nemo") or Path(name_or_path).exists():
        model = ASRModel.restore_from(name_or_path, map_location=torch.device(device))
    else:
        model = ASRModel.from_pretrained(name_or_path, map_location=torch.device(device))
    return model.to(device).eval()


def _text_llm(model):
    """The model's LLM as a plain text LLM: LoRA adapters off where there are any."""
    return model.llm.disable_adapter() if hasattr(model.llm, "disable_adapter") else contextlib.nullcontext()


def _audio_input(entry: ManifestEntry, sample_rate: int):
    """A path for whole files; the segment's waveform where the line has an ``offset``."""
    return _load_segment(entry, sample_rate) if "offset" in entry.data else entry["audio_filepath"]


def _load_segment(entry: ManifestEntry, sample_rate: int):
    """Mono waveform (numpy) of the line's ``offset``/``duration`` segment at ``sample_rate``."""
    from lhotse import Recording

    recording = Recording.from_file(entry["audio_filepath"]).resample(sample_rate)
    offset = float(entry.get("offset") or 0.0)
    return recording.load_audio(offset=offset, duration=float(entry["duration"])).mean(axis=0)


Answerer = Callable[[list[dict], list[int]], list[str]]  # (items, per-item token caps) -> answers


def _task_caps(items: list[dict], catalog: TaskCatalog, max_new_tokens: int) -> list[int]:
    """Each item's token cap: its task's own, within the run's ``max_new_tokens`` (one batch may mix caps)."""
    caps = [catalog.task(item["prompt"].task).max_new_tokens for item in items]
    return [min(max_new_tokens, cap or max_new_tokens) for cap in caps]


def _text_answerer(model: _LazyModel, texts: Callable[[dict], str], settings: dict):
    """Text LLM answers to the prompt rendered with ``texts(item)`` in place of ``{input}``."""

    def answer(items: list[dict], caps: list[int]) -> list[str]:
        m = model.get()
        prompts = [item["prompt"].render(texts(item)) for item in items]
        with _text_llm(m):
            return m.respond([None] * len(items), prompts, max_new_tokens=caps, **settings)

    return answer


def _speech_answerer(model: _LazyModel, settings: dict):
    """Speech model answers: the prompt with the audio locator in place of ``{input}``."""

    def answer(items: list[dict], caps: list[int]) -> list[str]:
        m = model.get()
        prompts = [item["prompt"].render(m.audio_locator_tag) for item in items]
        audios = [_audio_input(item["entry"], m.sampling_rate) for item in items]
        return m.respond(audios, prompts, max_new_tokens=caps, **settings)

    return answer


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class _Job:
    """What every answer job of one benchmark run shares."""

    catalog: TaskCatalog
    out_dir: Path
    batch_size: int
    max_new_tokens: int
    settings: dict  # keyword arguments for SpeechLMModel.respond

    def answer(self, items: list[dict], answer: Answerer) -> list[str]:
        """``answer``'s texts for ``items``, each capped at its task's token cap."""
        return answer(items, _task_caps(items, self.catalog, self.max_new_tokens))


def _generate_references(items: list[dict], llm: _LazyModel, job: _Job) -> tuple[dict[str, str], RunSummary]:
    """The text upper bound's answers, cached in ``references.jsonl`` (reruns reuse them)."""
    answer = _text_answerer(llm, lambda item: item["entry"][TRANSCRIPT_FIELD], job.settings)

    def process(batch: list[dict]) -> list[dict]:
        texts = job.answer(batch, answer)
        return [{"key": it["key"], "utt": it["utt"], "task": it["prompt"].task, "prompt_id": it["prompt"].id,
                 "prompt": it["prompt"].text, "reference": text} for it, text in zip(batch, texts)]

    path = job.out_dir / "references.jsonl"
    summary = run_resumable(items, process, path, job.batch_size, desc="References (text LLM on transcripts)")
    return {r["key"]: r["reference"] for r in _read_jsonl(path)}, summary


def _transcribe(items: list[dict], asr: _LazyModel, job: _Job) -> tuple[dict[str, str], RunSummary]:
    """ASR transcripts per utterance for the cascade, cached in ``asr_transcripts.jsonl``."""
    utterances = list({item["utt"]: {"utt": item["utt"], "entry": item["entry"]} for item in items}.values())

    def process(batch: list[dict]) -> list[dict]:
        model = asr.get()
        sample_rate = model.cfg.preprocessor.sample_rate
        audio = [_audio_input(u["entry"], sample_rate) for u in batch]
        if any(not isinstance(a, str) for a in audio):  # transcribe() takes paths or arrays, not a mix
            audio = [_load_segment(u["entry"], sample_rate) for u in batch]
        texts = _hypothesis_texts(model.transcribe(audio, batch_size=job.batch_size, verbose=False, num_workers=0))
        return [{"utt": u["utt"], "audio_filepath": u["entry"]["audio_filepath"], "asr_transcript": t}
                for u, t in zip(batch, texts)]

    path = job.out_dir / "asr_transcripts.jsonl"
    summary = run_resumable(utterances, process, path, job.batch_size, desc="ASR transcripts (cascade)", key="utt")
    return {r["utt"]: r["asr_transcript"] for r in _read_jsonl(path)}, summary


def _hypothesis_texts(output) -> list[str]:
    """NeMo's ``transcribe`` returns strings, Hypotheses, or a (best, all) tuple of either."""
    if isinstance(output, tuple):
        output = output[0]
    return [h if isinstance(h, str) else h.text for h in output]


def _predict(system: str, items: list[dict], answer: Answerer | None,
             references: dict[str, str], job: _Job) -> dict:
    """One system's scored answers appended to ``predictions.jsonl``; lines already there are kept.

    ``answer(items, caps)`` gives the system's texts; ``None`` means the text upper bound,
    whose answers are the cached references themselves. Returns the runner's summary.
    """

    def answers_for(batch: list[dict]) -> list[str]:
        if answer is None:
            return [references[it["key"]] for it in batch]
        return job.answer(batch, answer)

    def process(batch: list[dict]) -> list[dict]:
        return [_prediction_line(system, it, text, references[it["key"]], job.catalog)
                for it, text in zip(batch, answers_for(batch))]

    system_items = [{**it, "system": system} for it in items]
    summary = run_resumable(system_items, process, job.out_dir / "predictions.jsonl", job.batch_size,
                            desc=f"Predictions: {system}", key=_prediction_key)
    return summary.to_dict()


def _run_systems(items: list[dict], models: dict[str, str], asr_model: str | None, device: str, job: _Job) -> dict:
    """References, then every system's predictions; each model is loaded only if it has work left."""
    loaded = {name: _LazyModel(lambda p=path: _load_speech_model(p, device)) for name, path in models.items()}
    text_llm = loaded[next(iter(models))]
    references, summary = _generate_references(items, text_llm, job)
    runs = {"references": summary.to_dict()}
    if asr_model:
        asr = _LazyModel(lambda: _load_asr_model(asr_model, device))
        transcripts, summary = _transcribe(items, asr, job)
        asr.release()
        runs["asr_transcripts"] = summary.to_dict()
        answer = _text_answerer(text_llm, lambda item: transcripts[item["utt"]], job.settings)
        runs[CASCADE] = _predict(CASCADE, items, answer, references, job)
    for name, model in loaded.items():
        runs[name] = _predict(name, items, _speech_answerer(model, job.settings), references, job)
        model.release()
    runs[UPPER_BOUND] = _predict(UPPER_BOUND, items, None, references, job)
    return runs


def _prediction_key(record: dict) -> str:
    return f"{record['system']}|{record['key']}"


def _prediction_line(system: str, item: dict, prediction: str, reference: str, catalog: TaskCatalog) -> dict:
    task = catalog.task(item["prompt"].task)
    entry, transcript = item["entry"], item["entry"][TRANSCRIPT_FIELD]
    ground_truth = ground_truth_of(task, entry)
    line = {
        "system": system, "key": item["key"], "utt": item["utt"], "audio_filepath": entry["audio_filepath"],
        "task": task.name, "split": item["split"], "prompt_id": item["prompt"].id, "prompt": item["prompt"].text,
        "transcript": transcript, "reference": reference, "prediction": prediction,
        "scores": score_answer(task, prediction, reference, transcript, ground_truth),
        "copy_expected": copy_expected(task),
    }
    if ground_truth is not None:
        gt = task.ground_truth
        line["ground_truth"] = {"field": gt.field, "metric": gt.metric, "text": ground_truth}
    return line


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- aggregation


def summarize_lines(lines: list[dict]) -> dict:
    """Means and counts of one group of prediction lines (a split, a task, or both).

    ROUGE-L, chrF, follows_task: means over items. ``transcript_copy``: share of copies
    among items where a copy is a failure (None if none); copies on tasks that expect
    them are counted apart. Ground-truth metrics are corpus-level (total edits / total
    words; corpus BLEU) over the items that have one, with their count.
    """
    n = len(lines)
    out: dict[str, Any] = {"count": n}
    for name in ("rouge_l", "chrf", "follows_task"):
        out[name] = _mean([float(l["scores"][name]) for l in lines])
    failing = [l for l in lines if not l["copy_expected"]]
    expected = [l for l in lines if l["copy_expected"]]
    out["transcript_copy"] = _mean([float(l["scores"]["transcript_copy"]) for l in failing])
    out["transcript_copy_count"] = len(failing)
    out["transcript_copy_where_expected"] = _mean([float(l["scores"]["transcript_copy"]) for l in expected])
    for metric in _GT_METRICS:
        scored = [l for l in lines if metric in l["scores"]]
        if scored:
            refs = [l["ground_truth"]["text"] for l in scored]
            hyps = [l["prediction"] for l in scored]
            out[metric] = _corpus_metric(metric, refs, hyps)
            out[f"{metric}_count"] = len(scored)
    return out


def _corpus_metric(metric: str, refs: list[str], hyps: list[str]) -> float:
    if metric == "gt_wer":
        return word_error_rate(refs, hyps)["wer"]
    if metric == "gt_cer":
        return char_error_rate(refs, hyps)["cer"]
    if metric == "gt_bleu":
        return bleu(refs, hyps)
    return chrf(refs, hyps)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(lines: list[dict], systems: Sequence[str], splits: Sequence[str]) -> dict:
    """Per system: overall, per split (all tasks and per task) and per task summaries."""
    by_system: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_system[line["system"]].append(line)
    result = {}
    for system in systems:
        own = by_system.get(system, [])
        per_split = {}
        for split in splits:
            in_split = [l for l in own if l["split"] == split]
            per_split[split] = {"all": summarize_lines(in_split), "tasks": _per_task(in_split)}
        result[system] = {"overall": summarize_lines(own), "splits": per_split, "tasks": _per_task(own)}
    return result


def _per_task(lines: list[dict]) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        groups[line["task"]].append(line)
    return {task: summarize_lines(group) for task, group in groups.items()}


# --------------------------------------------------------------------------- reports


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "rate":
        return f"{100 * value:.0f}%"
    if kind == "wer":
        return f"{100 * value:.1f}%" if math.isfinite(value) else "inf"
    if kind == "score100":
        return f"{value:.1f}"
    return f"{value:.3f}"


_ROWS = [("rouge_l", "ROUGE-L", "score"), ("chrf", "chrF", "score100"), ("follows_task", "follows task", "rate"),
         ("transcript_copy", "transcript copy", "rate"), ("gt_wer", _GT_LABELS["gt_wer"], "wer"),
         ("gt_cer", _GT_LABELS["gt_cer"], "wer"), ("gt_bleu", _GT_LABELS["gt_bleu"], "score100"),
         ("gt_chrf", _GT_LABELS["gt_chrf"], "score100")]


def summary_table(metrics: dict) -> str:
    """Markdown: per split, each system's mean ROUGE-L vs the reference (task-following rate)."""
    systems = list(metrics["systems"])
    rows = [f"| Split | n | {' | '.join(systems)} |", "|---|---:|" + "---:|" * len(systems)]
    for split in metrics["config"]["splits"]:
        cells = []
        for system in systems:
            s = metrics["systems"][system]["splits"][split]["all"]
            cells.append(f"{_fmt(s['rouge_l'], 'score')} ({_fmt(s['follows_task'], 'rate')})")
        count = metrics["systems"][systems[0]]["splits"][split]["all"]["count"]
        rows.append(f"| {SPLIT_TITLES[split]} | {count} | {' | '.join(cells)} |")
    return "\n".join(rows)


def _split_table(metrics: dict, split: str) -> str:
    systems = list(metrics["systems"])
    rows = [f"| Task | n | Metric | {' | '.join(systems)} |", "|---|---:|---|" + "---:|" * len(systems)]
    first = metrics["systems"][systems[0]]["splits"][split]
    groups = [("**all tasks**", "all")] + [(task, task) for task in first["tasks"]]
    for label, name in groups:
        summaries = [_group(metrics["systems"][s]["splits"][split], name) for s in systems]
        shown = False
        for key, metric_label, kind in _ROWS:
            if all(s.get(key) is None for s in summaries):
                continue
            if key == "transcript_copy" and name != "all" and summaries[0].get("transcript_copy_count") == 0:
                continue
            head = f"{label} | {summaries[0].get('count', 0)}" if not shown else " | "
            if key in _GT_METRICS and name == "all":  # scored on a subset of the split's items
                metric_label += f" (n={summaries[0].get(f'{key}_count', 0)})"
            rows.append(f"| {head} | {metric_label} | {' | '.join(_fmt(s.get(key), kind) for s in summaries)} |")
            shown = True
        if name != "all" and summaries[0].get("transcript_copy_count") == 0 and summaries[0].get("count"):
            cells = " | ".join(_fmt(s.get("transcript_copy_where_expected"), "rate") for s in summaries)
            rows.append(f"|  |  | transcript copy (expected, not a failure) | {cells} |")
    return "\n".join(rows)


def _group(split_metrics: dict, name: str) -> dict:
    return split_metrics["all"] if name == "all" else split_metrics["tasks"].get(name, {})


def write_results_md(metrics: dict, path: Path) -> None:
    """``results.md``: the split summary, then one table per split with tasks as rows, systems side by side."""
    cfg = metrics["config"]
    skipped = metrics["skipped_lines"]["total"]
    parts = [
        "# Generalization benchmark",
        "",
        f"Manifest `{cfg['manifest']}`: {cfg['utterances']} utterances, {skipped} bad line(s) skipped; catalog "
        f"`{cfg['catalog']}`; {cfg['prompts_per_task'] or 'all'} prompt(s) per task and split, seed {cfg['seed']}.",
        "",
        "Reference for every item: the text LLM's answer to the transcript under the same prompt "
        f"(`{UPPER_BOUND}`, which matches it by definition). ROUGE-L (0-1) and chrF (0-100) are against "
        "that reference; *follows task* is the task's check; *transcript copy* is the share of answers "
        "that only repeat the transcript (a failure, except for tasks that ask for it); ground-truth "
        "metrics are corpus-level against the manifest field named by the task.",
        "",
        "## Summary: mean ROUGE-L (task-following rate)",
        "",
        summary_table(metrics),
    ]
    for split in cfg["splits"]:
        parts += ["", f"## {SPLIT_TITLES[split]}", "", _split_table(metrics, split)]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def plot_splits(metrics: dict, path: Path) -> None:
    """``splits.png``: mean ROUGE-L and task-following rate per split, systems side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems, splits = list(metrics["systems"]), metrics["config"]["splits"]
    fig = Figure(figsize=(5 + 1.2 * len(splits) * len(systems) / 2, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / len(systems)
    for ax, key, title in zip(fig.subplots(1, 2), ("rouge_l", "follows_task"),
                              ("ROUGE-L vs text upper bound", "Task-following rate")):
        for i, system in enumerate(systems):
            values = [metrics["systems"][system]["splits"][s]["all"][key] or 0.0 for s in splits]
            xs = [x + (i - (len(systems) - 1) / 2) * width for x in range(len(splits))]
            ax.bar(xs, values, width, label=system)
        ax.set_xticks(range(len(splits)), [SPLIT_TITLES[s].split(" (")[0].replace(", ", ",\n") for s in splits])
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(systems), fontsize="small")
    fig.savefig(path, dpi=120)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- run config


def _source(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _check_run_config(out_dir: Path, config: dict) -> None:
    """Refuse to mix cached answers made under other settings into this run's results.

    Settings that change answers must match; systems may be added (names must keep
    their model), which is how several models are compared in one directory.
    """
    path = out_dir / CONFIG_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        for field in ("reference_model", "max_new_tokens", "generation_kwargs"):
            if old.get(field) != config[field]:
                raise InputError(
                    f"{out_dir} holds results made with {field}={old.get(field)!r}, this run asks for "
                    f"{config[field]!r}; use another --out-dir (or delete {out_dir}) so cached answers are not mixed."
                )
        for name, source in config["systems"].items():
            if name in old.get("systems", {}) and old["systems"][name] != source:
                raise InputError(
                    f"{out_dir} holds answers of system {name!r} from {old['systems'][name]}, this run gives "
                    f"{source}; give the model another name (NAME=PATH) or use another --out-dir."
                )
        config = {**config, "systems": {**old.get("systems", {}), **config["systems"]}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- entry point


def run_benchmark(
    models: dict[str, str],
    manifest: str | Path,
    out_dir: str | Path,
    catalog: str | Path | TaskCatalog | None = None,
    prompts_per_task: int | None = 2,
    splits: Sequence[str] = EVALUATION_SPLITS,
    asr_model: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    **generation_kwargs,
) -> dict:
    """Run the benchmark for ``models`` (name -> ``.nemo``) and write all outputs to ``out_dir``.

    Returns the metrics (as in ``metrics.json``) plus ``outputs`` (paths) and ``runs``
    (what each resumable job computed this time). ``tasks`` restricts the catalog;
    generation kwargs go to ``SpeechLMModel.respond`` for every system.
    """
    _check_models(models)
    catalog = catalog if isinstance(catalog, TaskCatalog) else TaskCatalog.load(catalog)
    if tasks:
        catalog = catalog.select(tasks)  # an unknown name raises UnknownTaskError listing the known tasks
    device = _resolve_device(device)
    out_dir = Path(out_dir)
    skipped = SkipSummary()
    items = benchmark_items(manifest, catalog, splits, prompts_per_task, seed, skipped)
    if not items:
        raise InputError(
            f"no benchmark items: {manifest} has no valid lines ({skipped}) or the chosen splits have no prompts"
        )

    first = next(iter(models))
    systems = {name: _source(path) for name, path in models.items()}
    if asr_model:
        systems[CASCADE] = f"asr:{_source(asr_model)} -> text LLM of {first}"
    systems[UPPER_BOUND] = f"text LLM of {first}"
    _check_run_config(out_dir, {"reference_model": _source(models[first]), "max_new_tokens": max_new_tokens,
                                "generation_kwargs": generation_kwargs, "systems": systems})

    job = _Job(catalog, out_dir, batch_size, max_new_tokens, {"batch_size": batch_size, **generation_kwargs})
    runs = _run_systems(items, models, asr_model, device, job)
    config = {"manifest": str(manifest), "catalog": str(catalog.path), "tasks": catalog.names, "splits": list(splits),
              "prompts_per_task": prompts_per_task, "seed": seed, "max_new_tokens": max_new_tokens,
              "generation_kwargs": generation_kwargs, "utterances": len({it["utt"] for it in items}),
              "items": len(items), "systems": systems, "reference_model": first}
    return write_reports(items, list(systems), config, skipped, runs, out_dir)


def _check_models(models: dict[str, str]) -> None:
    if not models:
        raise ValueError("run_benchmark needs at least one model (name -> .nemo path)")
    for name, path in models.items():
        if name in (UPPER_BOUND, CASCADE):
            raise InputError(f"model name {name!r} is reserved for a baseline; name the model something else")
        if not Path(path).is_file():
            raise FileNotFoundError(f"model {name!r}: .nemo file not found: {path}")


def write_reports(items: list[dict], systems: list[str], config: dict, skipped: SkipSummary,
                  runs: dict, out_dir: Path) -> dict:
    """``metrics.json``, ``results.md`` and ``splits.png`` from this run's lines of ``predictions.jsonl``."""
    wanted = {it["key"]: it for it in items}
    lines = []
    for line in _read_jsonl(out_dir / "predictions.jsonl"):
        if line["system"] in systems and line["key"] in wanted:
            item = wanted[line["key"]]
            if line["prompt"] != item["prompt"].text:
                raise InputError(
                    f"{out_dir / 'predictions.jsonl'}: the answer for {line['key']} was made for prompt "
                    f"{line['prompt']!r}, the catalog now says {item['prompt'].text!r}; use another --out-dir."
                )
            lines.append(line)
    outputs = {name: str(out_dir / name) for name in
               ("predictions.jsonl", "references.jsonl", "metrics.json", "results.md", "splits.png")}
    metrics = {
        "config": config,
        "skipped_lines": {"total": skipped.total, "counts": dict(skipped.counts), "examples": dict(skipped.examples)},
        "systems": aggregate(lines, systems, config["splits"]),
        "runs": runs,
        "outputs": outputs,
    }
    metrics = _json_safe(metrics)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_results_md(metrics, out_dir / "results.md")
    plot_splits(metrics, out_dir / "splits.png")
    return metrics


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- CLI


def parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH.nemo`` or ``PATH.nemo`` (named after the file) -> ordered {name: path}."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise InputError(f"--model {spec!r}: expected NAME=PATH.nemo or PATH.nemo")
        if name in models:
            raise InputError(f"--model: two models named {name!r}; name them apart with NAME=PATH.nemo")
        models[name] = path
    return models


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags (for a subcommand of ``examples/evaluate.py``)."""
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH.nemo",
                        help="speech LLM to evaluate; repeat to compare models side by side (the first one's "
                             "LLM, LoRA off, gives the references)")
    parser.add_argument("--manifest", required=True,
                        help="held-out NeMo manifest (audio_filepath, duration, text, ...)")
    parser.add_argument("--out-dir", required=True, help="output directory; rerun the same command to resume")
    parser.add_argument("--catalog", default=None, help="task catalog YAML (default: nemo_speechlm/conf/mtbi/tasks.yaml)")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the catalog")
    parser.add_argument("--prompts-per-task", type=int, default=2, help="prompts per task and split (seeded choice)")
    parser.add_argument("--asr-model", default=None, help="NeMo ASR .nemo or model name: adds the cascade baseline")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer cap (tasks may set a lower one)")
    parser.add_argument("--seed", type=int, default=0, help="which prompts are drawn per task and split")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark from parsed flags; print the summary table and where the outputs are."""
    metrics = run_benchmark(
        parse_model_specs(args.model), args.manifest, args.out_dir, catalog=args.catalog,
        prompts_per_task=args.prompts_per_task, asr_model=args.asr_model, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, tasks=args.tasks, device=args.device,
    )
    print("Mean ROUGE-L vs the text upper bound (task-following rate):\n")
    print(summary_table(metrics))
    if metrics["skipped_lines"]["total"]:
        print(f"\nSkipped manifest lines: {metrics['skipped_lines']['total']} {metrics['skipped_lines']['counts']}")
    print("\nOutputs:")
    for name, path in metrics["outputs"].items():
        print(f"  {name:18s} {path}")
    return metrics
