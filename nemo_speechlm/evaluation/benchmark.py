"""The MTBI generalization benchmark: does the speech LLM behave on speech the way its LLM
behaves on the transcript, for prompts and tasks it never saw in training?

Items are (held-out utterance x evaluation prompt) for the catalog's three splits
(``seen_task_seen_prompt``, ``seen_task_heldout_prompt``, ``heldout_task``), prompts drawn
per task deterministically from ``seed``. Systems answer every item:

* each speech model (``.nemo``): the prompt with ``{input}`` replaced by the audio locator;
* ``cascade`` (when an ASR model is given): the text LLM on the ASR transcript;
* ``text_upper_bound``: the text LLM (the first model's base LLM: LoRA off, or reloaded when it
  was fine-tuned without LoRA) on the transcript.
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

This module runs the jobs and holds the command line; the pieces are ``benchmark_items`` (what is
asked), ``benchmark_systems`` (who answers), ``benchmark_scoring`` (scores and their aggregation)
and ``benchmark_report`` (``results.md`` and ``splits.png``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nemo_speechlm.data.audio import load_entry_audio
from nemo_speechlm.data.manifest import SkipSummary
from nemo_speechlm.data.task_catalog import EVALUATION_SPLITS, TaskCatalog
from nemo_speechlm.errors import InputError
from nemo_speechlm.evaluation.benchmark_items import TRANSCRIPT_FIELD, benchmark_items, copy_expected, ground_truth_of
from nemo_speechlm.evaluation.benchmark_report import (
    SPLIT_TITLES, differences_table, format_difference, plot_splits, summary_table, write_results_md,
)
from nemo_speechlm.evaluation.benchmark_scoring import (
    aggregate, paired_difference, paired_differences, score_answer, summarize_lines,
)
from nemo_speechlm.evaluation.benchmark_systems import (
    CASCADE,
    UPPER_BOUND,
    Answerer,
    LazyModel,
    audio_input,
    speech_answerer,
    task_caps,
    text_answerer,
)
from nemo_speechlm.models.base_llm import base_llm_identity
from nemo_speechlm.models.loading import load_asr_model, load_model, model_id
from nemo_speechlm.parts.checkpoint import read_nemo_config
from nemo_speechlm.parts.cli import positive_int
from nemo_speechlm.parts.device import resolve_device
from nemo_speechlm.parts.runner import (RunSummary, keep_only, read_json_object, run_resumable, update_records,
                                         write_json_atomic)

__all__ = [  # the public names, wherever they live (benchmark_items, _scoring, _systems, _report)
    "CASCADE", "SPLIT_TITLES", "UPPER_BOUND", "add_arguments", "aggregate", "benchmark_items", "copy_expected",
    "differences_table", "format_difference", "ground_truth_of", "main", "paired_difference", "paired_differences",
    "parse_model_specs", "plot_splits", "run_benchmark", "score_answer", "summarize_lines", "summary_table",
    "write_reports", "write_results_md",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "benchmark_config.json"
REFERENCES, ASR_TRANSCRIPTS, PREDICTIONS = "references.jsonl", "asr_transcripts.jsonl", "predictions.jsonl"


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
        return answer(items, task_caps(items, self.catalog, self.max_new_tokens))


def _generate_references(items: list[dict], llm: LazyModel, job: _Job) -> tuple[dict[str, str], RunSummary]:
    """The text upper bound's answers, cached in ``references.jsonl`` (reruns reuse them)."""
    answer = text_answerer(llm, lambda item: item["entry"][TRANSCRIPT_FIELD], job.settings)

    def process(batch: list[dict]) -> list[dict]:
        texts = job.answer(batch, answer)
        return [{"key": it["key"], "utt": it["utt"], "task": it["prompt"].task, "prompt_id": it["prompt"].id,
                 "prompt": it["prompt"].text, "transcript": it["entry"][TRANSCRIPT_FIELD], "reference": text}
                for it, text in zip(batch, texts)]

    path = job.out_dir / REFERENCES
    summary = run_resumable(items, process, path, job.batch_size, desc="References (text LLM on transcripts)",
                            exclusive=False)
    return {r["key"]: r["reference"] for r in _read_jsonl(path)}, summary


def _transcribe(items: list[dict], asr: LazyModel, job: _Job) -> tuple[dict[str, str], RunSummary]:
    """ASR transcripts per utterance for the cascade, cached in ``asr_transcripts.jsonl``."""
    utterances = list({item["utt"]: {"utt": item["utt"], "entry": item["entry"]} for item in items}.values())

    def process(batch: list[dict]) -> list[dict]:
        model = asr.get()
        sample_rate = model.cfg.preprocessor.sample_rate
        audio = [audio_input(u["entry"], sample_rate) for u in batch]
        if any(not isinstance(a, str) for a in audio):  # transcribe() takes paths or arrays, not a mix
            audio = [load_entry_audio(u["entry"], sample_rate) for u in batch]
        texts = _hypothesis_texts(model.transcribe(audio, batch_size=job.batch_size, verbose=False, num_workers=0))
        return [{"utt": u["utt"], "audio_filepath": u["entry"]["audio_filepath"], "asr_transcript": t}
                for u, t in zip(batch, texts)]

    path = job.out_dir / ASR_TRANSCRIPTS
    summary = run_resumable(utterances, process, path, job.batch_size, desc="ASR transcripts (cascade)", key="utt",
                            exclusive=False)
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
    summary = run_resumable(system_items, process, job.out_dir / PREDICTIONS, job.batch_size,
                            desc=f"Predictions: {system}", key=_prediction_key, exclusive=False)
    return summary.to_dict()


def _run_systems(items: list[dict], loaded: dict[str, LazyModel], asr_model: str | None, device: str,
                 job: _Job) -> dict:
    """References, then every system's predictions; each model is loaded only if it has work left."""
    text_llm = loaded[next(iter(loaded))]
    references, summary = _generate_references(items, text_llm, job)
    runs = {"references": summary.to_dict()}
    if asr_model:
        asr = LazyModel(lambda: load_asr_model(asr_model, device))
        transcripts, summary = _transcribe(items, asr, job)
        asr.release()
        runs["asr_transcripts"] = summary.to_dict()
        answer = text_answerer(text_llm, lambda item: transcripts[item["utt"]], job.settings)
        runs[CASCADE] = _predict(CASCADE, items, answer, references, job)
    for name, model in loaded.items():
        runs[name] = _predict(name, items, speech_answerer(model, job.settings), references, job)
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
    """A model file as it is now (absolute path + modification time: a model retrained into the same
    file is another source, whose answers are not the cached ones), or a pretrained model's name."""
    return model_id(path) if Path(path).exists() else path


def _text_llm_of(out_dir: Path, path: str, model: LazyModel) -> str:
    """Identity of the text LLM that answers the references: the base LLM of the model at ``path``
    (:func:`~nemo_speechlm.models.base_llm.base_llm_identity`). The run config remembers it per model
    file, so a rerun with nothing left to answer loads no model."""
    known = _read_run_config(out_dir).get("text_llm_of", {})
    return known.get(_source(path)) or base_llm_identity(model.get())


def _read_run_config(out_dir: Path) -> dict:
    return read_json_object(out_dir / CONFIG_FILE, "benchmark's record of its settings")


def _check_run_config(out_dir: Path, config: dict, replace: bool = False) -> None:
    """Refuse to mix cached answers made under other settings into this run's results (with ``replace``:
    drop them, to be made anew).

    Settings that change answers must match; systems may be added (names must keep
    their model), which is how several models are compared in one directory.
    """
    old = _read_run_config(out_dir)
    changed = [(field, old[field]) for field in ("reference_model", "max_new_tokens", "generation_kwargs")
               if field in old and old[field] != config[field]]
    if changed and replace:
        field, before = changed[0]
        log.warning("%s: every cached answer was made with %s=%r, this run has %r: dropping them all",
                    out_dir, field, before, config[field])
        _remove_answers(out_dir, REFERENCES, ASR_TRANSCRIPTS, PREDICTIONS)
        old = {"text_llm_of": old.get("text_llm_of", {})}
    elif changed:
        field, before = changed[0]
        raise InputError(
            f"{out_dir} holds results made with {field}={before!r}, this run asks for "
            f"{config[field]!r}; use another --out-dir (or delete {out_dir}) so cached answers are not mixed.",
            "pass --replace to drop them all and answer anew",
        )
    before = old.get("systems", {})
    # only systems with answers: a model that failed to load was recorded, and blocked its corrected rerun
    answered = {record.get("system") for record in _read_jsonl(out_dir / PREDICTIONS)}
    if _read_jsonl(out_dir / ASR_TRANSCRIPTS):  # the cascade's first half
        answered.add(CASCADE)
    stale = [name for name, source in config["systems"].items()
             if name in before and before[name] != source and name in answered]
    if stale and not replace:
        name = stale[0]
        raise InputError(
            f"{out_dir} holds answers of system {name!r} from {before[name]}, this run gives "
            f"{config['systems'][name]}; give the model another name (NAME=PATH) or use another --out-dir.",
            "pass --replace to drop that system's answers and answer anew (a retrained model)",
        )
    if stale:
        log.warning("%s: dropping the cached answers of %s (made by another model under the same name)",
                    out_dir, ", ".join(stale))
        keep_only(out_dir / PREDICTIONS, set(before) - set(stale), key="system", why="systems whose model changed")
        if CASCADE in stale:  # the cascade's ASR model changed: its transcripts too
            _remove_answers(out_dir, ASR_TRANSCRIPTS)
    config = {**config, "systems": {**before, **config["systems"]},
              "text_llm_of": {**old.get("text_llm_of", {}), **config["text_llm_of"]}}
    write_json_atomic(out_dir / CONFIG_FILE, config)


def _drop_answers_to_changed_items(out_dir: Path, items: list[dict]) -> None:
    """Drop the cached reference and answers of every item whose transcript (a corrected manifest) or prompt text
    (an edited catalog: prompt ids are positions, ``summarize/3``) has changed since, so they are made anew. Keyed by
    audio and prompt id, they were reused: a model added later was scored against the text LLM's answer to the old
    transcript or prompt. References and prediction lines carry both (references written before 2026-12-07 carry no
    transcript; their predictions do)."""
    now = {it["key"]: {"transcript": it["entry"][TRANSCRIPT_FIELD], "prompt": it["prompt"].text} for it in items}
    cached = {path: _read_jsonl(out_dir / path) for path in (REFERENCES, PREDICTIONS)}
    stale = {r["key"] for records in cached.values() for r in records if r["key"] in now
             and any(field in r and r[field] != value for field, value in now[r["key"]].items())}
    if not stale:
        return
    why = f"items whose transcript or prompt changed ({len(stale)} items, e.g. {min(stale)!r})"
    keep_only(out_dir / REFERENCES, {r["key"] for r in cached[REFERENCES]} - stale, why=why)
    keep_only(out_dir / PREDICTIONS, {_prediction_key(r) for r in cached[PREDICTIONS] if r["key"] not in stale},
              key=_prediction_key, why=why)


def _remove_answers(out_dir: Path, *names: str) -> None:
    """Delete answer files and their runner sidecars (``.summary.json``, ``.rejected.jsonl``, ...)."""
    for name in names:
        for path in out_dir.glob(f"{name}*"):
            path.unlink()


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
    replace: bool = False,
    **generation_kwargs,
) -> dict:
    """Run the benchmark for ``models`` (name -> ``.nemo``) and write all outputs to ``out_dir``.

    Returns the metrics (as in ``metrics.json``) plus ``outputs`` (paths) and ``runs``
    (what each resumable job computed this time). ``tasks`` restricts the catalog;
    generation kwargs go to ``SpeechLMModel.respond`` for every system. Answers cached in ``out_dir``
    by another model under the same name (a retrained file), or under other settings, are refused,
    or dropped and made anew with ``replace``; references made by the same base LLM are reused.
    """
    _check_models(models)
    generation_kwargs = _with_one_system_prompt(generation_kwargs, models)
    catalog = catalog if isinstance(catalog, TaskCatalog) else TaskCatalog.load(catalog)
    if tasks:
        catalog = catalog.select(tasks)  # an unknown name raises UnknownTaskError listing the known tasks
    device = str(resolve_device(device))
    out_dir = Path(out_dir)
    skipped = SkipSummary()
    items = benchmark_items(manifest, catalog, splits, prompts_per_task, seed, skipped)
    if not items:
        raise InputError(
            f"no benchmark items: {manifest} has no valid lines ({skipped}) or the chosen splits have no prompts"
        )

    first = next(iter(models))
    loaded = {name: LazyModel(lambda p=path: load_model(p, device)) for name, path in models.items()}
    reference = _text_llm_of(out_dir, models[first], loaded[first])
    systems = {name: _source(path) for name, path in models.items()}
    if asr_model:
        systems[CASCADE] = f"asr:{_source(asr_model)} -> {reference}"
    systems[UPPER_BOUND] = reference
    _check_run_config(out_dir, {"reference_model": reference, "max_new_tokens": max_new_tokens,
                                "generation_kwargs": generation_kwargs, "systems": systems,
                                "text_llm_of": {_source(models[first]): reference}}, replace)

    _drop_answers_to_changed_items(out_dir, items)
    # (system_prompt "" when none: respond's default is the model's own)
    job = _Job(catalog, out_dir, batch_size, max_new_tokens,
               {"batch_size": batch_size, "system_prompt": "", **generation_kwargs})
    runs = _run_systems(items, loaded, asr_model, device, job)
    config = {"manifest": str(manifest), "catalog": str(catalog.path), "tasks": catalog.names, "splits": list(splits),
              "prompts_per_task": prompts_per_task, "seed": seed, "max_new_tokens": max_new_tokens,
              "generation_kwargs": generation_kwargs, "utterances": len({it["utt"] for it in items}),
              "items": len(items), "systems": systems, "reference_model": first}
    return write_reports(items, list(systems), config, skipped, runs, out_dir, catalog)


def _with_one_system_prompt(generation_kwargs: dict, models: dict[str, str]) -> dict:
    """``generation_kwargs`` with the one system prompt every system answers under: the one given, else the one the
    first model trained under (recorded in its ``.nemo``), so the text LLM's references are made under the prompt
    its behaviors were generated with. The key is left out when there is none (``""``: none), as in runs cached
    before models recorded theirs."""
    kwargs = dict(generation_kwargs)
    given = kwargs.pop("system_prompt", None)
    trained = {name: read_nemo_config(path).get("system_prompt") or None for name, path in models.items()}
    prompt = (next(iter(trained.values())) if given is None else given) or None
    if given is None and any(p != prompt for p in trained.values()):
        log.warning("The models trained under different system prompts (%s); every system answers under the first "
                    "model's, %r (pass --system-prompt to choose)", trained, prompt)
    return {**kwargs, "system_prompt": prompt} if prompt else kwargs


def _check_models(models: dict[str, str]) -> None:
    if not models:
        raise ValueError("run_benchmark needs at least one model (name -> .nemo path)")
    for name, path in models.items():
        if name in (UPPER_BOUND, CASCADE):
            raise InputError(f"model name {name!r} is reserved for a baseline; name the model something else")
        if not Path(path).is_file():
            raise FileNotFoundError(f"model {name!r}: .nemo file not found: {path}")


def write_reports(items: list[dict], systems: list[str], config: dict, skipped: SkipSummary,
                  runs: dict, out_dir: Path, catalog: TaskCatalog) -> dict:
    """``metrics.json``, ``results.md`` and ``splits.png`` from this run's lines of ``predictions.jsonl``.

    Cached answers are scored again first (and their lines updated where the scores differ): answers made before
    a change to the scoring or to a task's label check kept their old scores, and the metrics were aggregated
    from them."""
    wanted = {it["key"]: it for it in items}
    path = out_dir / PREDICTIONS

    def rescored(line: dict) -> dict:
        if line["system"] not in systems or line["key"] not in wanted:
            return line
        item = wanted[line["key"]]
        if line["prompt"] != item["prompt"].text:
            raise InputError(
                f"{path}: the answer for {line['key']} was made for prompt "
                f"{line['prompt']!r}, the catalog now says {item['prompt'].text!r}; use another --out-dir."
            )
        return _prediction_line(line["system"], item, line["prediction"], line["reference"], catalog)

    lines = [line for line in update_records(path, rescored, key=_prediction_key, why="scored again: they were "
                                             "scored by another version of the scoring or task checks")
             if line["system"] in systems and line["key"] in wanted]
    outputs = {name: str(out_dir / name) for name in
               (PREDICTIONS, REFERENCES, "metrics.json", "results.md", "splits.png")}
    metrics = {
        "config": config,
        "skipped_lines": {"total": skipped.total, "counts": dict(skipped.counts), "examples": dict(skipped.examples)},
        "systems": aggregate(lines, systems, config["splits"]),
        "differences": paired_differences(lines, [s for s in systems if s != UPPER_BOUND], config["splits"]),
        "runs": runs,
        "outputs": outputs,
    }
    metrics = _json_safe(metrics)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_results_md(metrics, out_dir / "results.md")
    plot_splits(metrics, out_dir / "splits.png")
    return metrics


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
                             "base LLM gives the references; models on the same LLM share them)")
    parser.add_argument("--manifest", required=True,
                        help="held-out NeMo manifest (audio_filepath, duration, text, ...)")
    parser.add_argument("--out-dir", required=True, help="output directory; rerun the same command to resume")
    parser.add_argument("--catalog", default=None, help="task catalog YAML (default: nemo_speechlm/conf/mtbi/tasks.yaml)")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the catalog")
    parser.add_argument("--prompts-per-task", type=int, default=2, help="prompts per task and split (seeded choice)")
    parser.add_argument("--asr-model", default=None, help="NeMo ASR .nemo or model name: adds the cascade baseline")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="answer cap (tasks may set a lower one)")
    parser.add_argument("--seed", type=int, default=0, help="which prompts are drawn per task and split")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--system-prompt", default=None,
                        help="system prompt for every system, the text LLM's references included (default: the one "
                             "the first model trained under, recorded in its .nemo, if any; '' for none)")
    parser.add_argument("--replace", action="store_true",
                        help="answers cached in --out-dir by another model under the same name (retrained) or under "
                             "other settings are dropped and made anew, instead of refused")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark from parsed flags; print the summary table and where the outputs are."""
    metrics = run_benchmark(
        parse_model_specs(args.model), args.manifest, args.out_dir, catalog=args.catalog,
        prompts_per_task=args.prompts_per_task, asr_model=args.asr_model, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, tasks=args.tasks, device=args.device,
        replace=args.replace,
        **({"system_prompt": args.system_prompt} if args.system_prompt is not None else {}),  # ('': none)
    )
    print("Mean ROUGE-L vs the text upper bound [95% interval over utterances] (task-following rate):\n")
    print(summary_table(metrics))
    if any(metrics["differences"].values()):
        print("\nPaired differences (same items):\n")
        print(differences_table(metrics))
    if metrics["skipped_lines"]["total"]:
        print(f"\nSkipped manifest lines: {metrics['skipped_lines']['total']} {metrics['skipped_lines']['counts']}")
    print("\nOutputs:")
    for name, path in metrics["outputs"].items():
        print(f"  {name:18s} {path}")
    return metrics
