"""Compare training objectives for the same speech LLM, on the same data, steps, batch size and seeds.

Conditions (frozen Whisper encoder and frozen LLM, only the connector's stage 2 trains, unless stated):
  asr_only            ASR-only speech SFT: "repeat" on every utterance
  single_task         single-task behavior imitation (BLSP-like): "continue" on every utterance
  mtbi_ce             MTBI: the multi-task behaviors, cross-entropy only, no interleaving
  mtbi_interleave     MTBI + speech-text interleaving (mtbi.yaml's probability)
  mtbi_interleave_kl  MTBI + interleaving + token-level KL to the text-mode teacher
  joint_sft           joint SFT: LoRA on the LLM, the MTBI behaviors as speech SFT, no text-only share
  joint_sft_text      joint SFT + the text-only share (VoiceTextBlender: 15% of the steps are text batches)

Stage 1 (connector CTC pre-alignment, the expensive part) runs once per seed; its connector is
saved and every condition of that seed starts from it (``connector_pretraining.init_from``). The
conditions then differ only in their data / objective keys (``CONDITIONS`` below). Every condition
and seed is evaluated with the generalization benchmark (ROUGE-L and task-following against the
text upper bound on the three splits), the listening diagnostics (held-out "repeat" WER and the
zero-audio control) and, for the conditions whose LLM changes (LoRA), text retention (agreement of
the trained model's text answers with the base LLM's).

Reuses a demo output folder (``--data-dir``, default ``demo_out``: corpus, behaviors, cached
features); what is missing there is made with ``examples/demo.py``'s own functions. Resumable: each
condition's ``.nemo`` and metrics JSON are written atomically and skipped when present. A rerun into the
same ``--out`` may add seeds or conditions, or change ``--benchmark-utterances`` / ``--eval-utterances``: the
trained models are kept, and only what the larger evaluation adds is answered; other steps, overrides or data
are refused (``settings.json``).

    python examples/compare_objectives.py [--out compare_out] [--data-dir demo_out] [--steps N] [--seeds N]
        [--no-freeze-connector] [--manifest TRAIN --heldout-manifest TEST] [hydra overrides of mtbi.yaml ...]

Outputs in ``--out``: ``results.md``, ``results.json``, ``results.png`` (split x condition),
``seed<k>/<condition>.nemo``, ``seed<k>/<condition>/metrics.json``, ``seed<k>/benchmark/``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib.util
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

import nemo_speechlm  # noqa: F401  (registries, resolvers)
from nemo_speechlm.data.manifest import read_manifest
from nemo_speechlm.data.task_catalog import EVALUATION_SPLITS, TRAIN, TaskCatalog, render_prompt
from nemo_speechlm.data.utterance import utterance_id
from nemo_speechlm.datagen.behaviors import behavior_items, behavior_job
from nemo_speechlm.datagen.chat_generator import build_chat_generator
from nemo_speechlm.evaluation.benchmark import SPLIT_TITLES, UPPER_BOUND, format_difference, paired_difference, run_benchmark
from nemo_speechlm.evaluation.benchmark_report import few_utterances_caution
from nemo_speechlm.evaluation.listening import listening_diagnostics
from nemo_speechlm.evaluation.standard import evaluate_text_retention
from nemo_speechlm.inference import load_model
from nemo_speechlm.models import JointSFTModel, MTBIModel
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli
from nemo_speechlm.parts.connector_ctc import save_aligned_connector
from nemo_speechlm.parts.precision import fastest_training_precision
from nemo_speechlm.parts.runner import check_run_settings, keep_only, run_resumable
from nemo_speechlm.recipe import pre_align_connector, train

REPO = Path(__file__).resolve().parents[1]
LOCATOR = "<|audio|>"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TEXT_SHARE = 0.15  # VoiceTextBlender: one text batch with probability 0.15


@dataclass(frozen=True)
class Condition:
    description: str
    data: str                      # "repeat" | "continue" | "mtbi": which behaviors file trains it
    interleave: bool = False       # mtbi.yaml's interleaving probability, else 0
    kl: bool = False               # model.mtbi.kl_weight = KL_WEIGHT
    lora: bool = False             # LoRA on the LLM (JointSFTModel)
    text_share: bool = False       # text-only SFT batches mixed in
    overrides: tuple = field(default=())


KL_WEIGHT = 1.0
CONDITIONS = {
    "asr_only": Condition("ASR-only speech SFT: repeat on every utterance", "repeat"),
    "single_task": Condition("single-task behavior imitation (BLSP-like): continue on every utterance", "continue"),
    "mtbi_ce": Condition("MTBI: multi-task behaviors, cross-entropy only", "mtbi"),
    "mtbi_interleave": Condition("MTBI + speech-text interleaving", "mtbi", interleave=True),
    "mtbi_interleave_kl": Condition("MTBI + interleaving + KL to the text-mode teacher", "mtbi", interleave=True, kl=True),
    "joint_sft": Condition("joint SFT, LoRA on the LLM, speech only", "mtbi", lora=True),
    "joint_sft_text": Condition("joint SFT, LoRA on the LLM, + text-only share", "mtbi", lora=True, text_share=True),
}
# Differences the results name, each (condition, baseline): what the issue asks to compare.
COMPARISONS = [("single_task", "asr_only"), ("mtbi_ce", "asr_only"), ("mtbi_ce", "single_task"),
               ("mtbi_interleave", "mtbi_ce"), ("mtbi_interleave_kl", "mtbi_interleave"), ("joint_sft", "mtbi_ce"),
               ("joint_sft_text", "joint_sft")]

# Cost model for the printed estimate (2 CPU cores, SmolLM2-135M, batch 8). Stage-2 step: ~1.6-2 s measured
# with the frozen connector (mtbi.yaml); CTC step: ~50 ms (parts/connector_ctc.py); answer generation
# (48 new tokens, batches of 64): measured 0.13-0.17 s per benchmark answer (2026-12-07; 0.4 was assumed
# before). KL adds the teacher's forward.
S_PER_STEP, S_PER_CTC_STEP, S_PER_ANSWER, KL_FACTOR, LORA_FACTOR = 1.8, 0.05, 0.16, 1.4, 1.2


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


@functools.cache
def load_demo():
    """``examples/demo.py`` as a module (its corpus / behavior functions are reused, not copied)."""
    spec = importlib.util.spec_from_file_location("speechlm_demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, data) -> None:
    """Atomic: a reader (or a resumed run) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- data


def base_config(out: Path, features: Path, steps: int, overrides: list[str]) -> DictConfig:
    """mtbi.yaml with the comparison's paths; the user's overrides come last and win."""
    ours = [f"trainer.precision={fastest_training_precision()}", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=10", "model.lr_scheduler.warmup_steps=10", f"feature_cache.dir={features}",
            "data.train_ds.input_cfg.0.manifest_filepath=unset"]
    return load_demo().compose_mtbi(ours, overrides)  # Whisper encodes each clip alone, as in the demo


def run_settings(base: DictConfig, manifests: dict[str, Path], behaviors: Path, args: argparse.Namespace) -> dict:
    """What the trained models in ``--out`` depend on (and the answers' length), but the seeds and conditions (a
    rerun may add those) and how many utterances evaluate them (:func:`evaluation_settings`): a rerun with other
    steps, overrides or data would otherwise reuse the ``.nemo`` files and metrics there."""
    digest = lambda path: f"{Path(path).resolve()} sha256:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"  # noqa: E731
    return {"config": recorded_config(base), "train_manifest": digest(manifests["train"]), "heldout_manifest": digest(manifests["heldout"]),
            "behaviors": digest(behaviors), "freeze_connector": args.freeze_connector, "max_utterances": args.max_utterances,
            "max_new_tokens": args.max_new_tokens}


def recorded_config(base: DictConfig) -> dict:
    """The training config as :func:`run_settings` records it."""
    config = OmegaConf.to_container(base, resolve=False)
    config["feature_cache"].pop("dir", None)  # where the features are cached does not change them
    config.pop("output_scope", None)  # nor whether a .nemo holds the base weights (same answers either way)
    return config


def evaluation_settings(args: argparse.Namespace) -> dict:
    """What a condition's metrics JSON was made with; another value evaluates it again, reusing the answers already
    made (a larger benchmark answers only its new utterances)."""
    return {"benchmark_utterances": args.benchmark_utterances, "eval_utterances": args.eval_utterances}


def condition_data(out: Path, behaviors: Path, teacher: str, batch_size: int, max_utterances: int = 0) -> dict[str, Path]:
    """One behaviors file per data kind, over the same utterances (those of ``behaviors``, the first
    ``max_utterances`` of them when > 0), and the text-only SFT file (the same behaviors with the
    transcript in place of the speech)."""
    data_dir = out / "data"
    rows = read_jsonl(behaviors)
    catalog = TaskCatalog.load()
    utterances, seen = [], set()
    for row in rows:
        uid = utterance_id(row)
        if uid not in seen:
            seen.add(uid)
            utterances.append({k: v for k, v in row.items() if k not in ("key", "task", "prompt", "prompt_id", "response",
                                                                        "split", "teacher")})
    if max_utterances:
        utterances = utterances[:max_utterances]
        kept = {utterance_id(u) for u in utterances}
        rows = [r for r in rows if utterance_id(r) in kept]
        behaviors = write_jsonl(data_dir / "behaviors_mtbi.jsonl", rows)
    manifest = write_jsonl(data_dir / "utterances.json", utterances)
    paths = {"mtbi": behaviors}
    generator = None
    for task, cap in (("repeat", 64), ("continue", 96)):
        path = data_dir / f"behaviors_{task}.jsonl"
        selected = catalog.select([task])
        items = list(behavior_items(manifest, selected, 1, 1, output_path=path))
        keep_only(path, [item["key"] for item in items])  # its own cache: drop other utterances' answers
        done = {r["key"] for r in read_jsonl(path)} if path.is_file() else set()
        if task != "repeat" and any(item["key"] not in done for item in items) and generator is None:
            generator = build_chat_generator("hf", model=teacher, batch_size=batch_size)
        job_generator = generator if generator is not None else _NoGenerator()
        summary = run_resumable(items, behavior_job(job_generator, selected, cap,
                                                    ground_truth_tasks=("repeat",) if task == "repeat" else ()),
                                path, batch_size=batch_size, desc=f"Behaviors ({task}) -> {path.name}")
        print(summary)
        paths[task] = path
    text = [{"id": r["key"], "conversations": [
        {"from": "User", "value": render_prompt(r["prompt"], r["text"])},
        {"from": "Assistant", "value": r["response"]}]} for r in rows]
    paths["text_sft"] = write_jsonl(data_dir / "text_sft.jsonl", text)
    print(f"data over {len(utterances)} utterances: " + ", ".join(
        f"{k} {len(read_jsonl(v))} lines" for k, v in paths.items()))
    return paths


class _NoGenerator:
    """Stands in for the teacher where every response is the ground truth (repeat): never asked."""

    def generation_settings(self) -> dict:
        return {}

    def generate(self, *args, **kwargs):
        raise RuntimeError("no LLM is needed for ground-truth behaviors")


def eval_files(out: Path, heldout: Path, benchmark_utterances: int, eval_utterances: int) -> dict[str, Path]:
    """The benchmark's held-out subset, the diagnostics' subset and text-only retention conversations
    (each evaluation utterance's transcript under one prompt of each split, cycling over the tasks).

    The subsets are read and checked as manifests (a bad line is an error naming it) and written with absolute audio
    paths: copied as text into ``OUT/data``, relative paths would point into the wrong folder."""
    entries = [entry.data for entry in islice(read_manifest(heldout), max(benchmark_utterances, eval_utterances))]
    bench = write_jsonl(out / "data" / "benchmark_manifest.json", entries[:benchmark_utterances])
    listen = write_jsonl(out / "data" / "eval_manifest.json", entries[:eval_utterances])
    catalog = TaskCatalog.load()
    prompts = [p for split in EVALUATION_SPLITS for p in catalog.evaluation_prompts(split, 1)]
    convs = [{"id": f"retention{i}", "conversations": [{"from": "User", "value": prompts[(7 * i) % len(prompts)].render(
        entry["text"])}]} for i, entry in enumerate(entries[:eval_utterances])]
    return {"benchmark": bench, "eval": listen, "retention": write_jsonl(out / "data" / "retention.jsonl", convs)}


# --------------------------------------------------------------------------- training


def seed_config(base: DictConfig, seed: int, train_manifest: Path, freeze: bool | None) -> DictConfig:
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        cfg.seed = seed
        cfg.connector_pretraining.seed = seed
        cfg.connector_pretraining.manifest_filepath = cfg.connector_pretraining.manifest_filepath or str(train_manifest)
        if freeze is not None:
            cfg.connector_pretraining.freeze_connector = freeze
        cfg.data.train_ds.seed = seed
        cfg.data.train_ds.input_cfg[0].seed = seed
    return cfg


def align_connector(cfg: DictConfig, path: Path) -> Path:
    """Stage 1 once per seed: CTC pre-alignment of a fresh connector, saved for every condition."""
    if path.is_file():
        print(f"reusing the aligned connector {path}")
        return path
    from nemo_speechlm.data.feature_cache import open_feature_cache

    torch.manual_seed(cfg.seed)
    model = MTBIModel(cfg.model)
    cache = open_feature_cache(cfg.get("feature_cache"), model)
    pre = copy.deepcopy(cfg.connector_pretraining)
    with open_dict(pre):
        pre.freeze_connector = False
    pre_align_connector(pre, model, cfg.data, cache, resuming=False)
    save_aligned_connector(model, path)
    return path


def condition_config(cfg: DictConfig, name: str, data: dict[str, Path], connector: Path, seed_dir: Path) -> DictConfig:
    """The seed's config with this condition's data / objective keys; nothing else differs."""
    cond = CONDITIONS[name]
    cfg = copy.deepcopy(cfg)  # every condition edits its own copy
    with open_dict(cfg):
        cfg.name = name
        cfg.output_nemo = str(seed_dir / f"{name}.nemo")  # written atomically: a file under this name is complete
        cfg.exp_manager.exp_dir = str(seed_dir / "runs")
        cfg.connector_pretraining.steps = 0
        cfg.connector_pretraining.init_from = str(connector)
        behaviors = cfg.data.train_ds.input_cfg[0]
        behaviors.manifest_filepath = str(data[cond.data])
        if not cond.interleave:
            behaviors.interleave.prob = 0.0
        cfg.model.mtbi.kl_weight = KL_WEIGHT if cond.kl else 0.0
        if cond.lora:
            cfg.model.target = "nemo_speechlm.models.JointSFTModel"
            cfg.model.lora = dict(LORA)
        if cond.text_share:
            train_ds = cfg.data.train_ds
            cfg.data.train_ds = {
                "multi_config": True, "sampler_fusion": "randomized_round_robin",
                "sampler_weights": {"audio": 1 - TEXT_SHARE, "text": TEXT_SHARE},
                "seed": train_ds.seed, "shard_seed": train_ds.shard_seed, "shuffle": True, "num_workers": 0,
                "audio": {"input_cfg": [behaviors], "batch_size": train_ds.batch_size,
                          "shuffle_buffer_size": train_ds.shuffle_buffer_size},
                "text": {"input_cfg": [{"type": "joint_text_sft", "manifest_filepath": str(data["text_sft"]),
                                        "tags": {"source": "text_sft"}}],
                         "batch_size": train_ds.batch_size, "shuffle_buffer_size": train_ds.shuffle_buffer_size},
            }
    return cfg


def train_condition(cfg: DictConfig, name: str, seed_dir: Path) -> Path:
    nemo = seed_dir / f"{name}.nemo"
    if nemo.is_file():
        print(f"[seed {cfg.seed}] {name}: reusing {nemo}")
        return nemo
    return train(cfg, JointSFTModel if CONDITIONS[name].lora else MTBIModel)


# --------------------------------------------------------------------------- evaluation


def evaluate_seed(seed_dir: Path, nemos: dict[str, Path], files: dict[str, Path], batch_size: int,
                  max_new_tokens: int, evaluation: dict) -> dict[str, dict]:
    """Metrics per condition of one seed; each condition's JSON is written once and reused while ``evaluation``
    (:func:`evaluation_settings`) stays the same."""
    paths = {name: seed_dir / name / "metrics.json" for name in nemos}
    todo = [name for name, path in paths.items()
            if not path.is_file() or json.loads(path.read_text()).get("evaluation") != evaluation]
    if todo:
        bench = run_benchmark({k: str(v) for k, v in nemos.items()}, files["benchmark"], seed_dir / "benchmark",
                              prompts_per_task=1, max_new_tokens=max_new_tokens, batch_size=batch_size)
        upper = bench["systems"][UPPER_BOUND]["splits"]
        repeat_prompt = TaskCatalog.load().task("repeat").prompts_in(TRAIN)[0].render(LOCATOR)
        for name in tqdm(todo, desc=f"Evaluating {seed_dir.name}", unit="condition"):
            model = load_model(str(nemos[name]))
            listening = listening_diagnostics(model, files["eval"], repeat_prompt, None, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, out_dir=seed_dir / name / "listening")
            metrics = {"evaluation": evaluation, "splits": {}}
            for split in EVALUATION_SPLITS:
                s = bench["systems"][name]["splits"][split]["all"]
                metrics["splits"][split] = {"rouge_l": s["rouge_l"], "follows_task": s["follows_task"], "n": s["count"],
                                            "upper_bound_follows_task": upper[split]["all"]["follows_task"]}
            metrics["repeat_wer"] = listening["speech"]["wer"]
            metrics["zero_audio_wer"] = listening["zero_audio"]["wer"]
            metrics["text_oracle_wer"] = listening["text_oracle"]["wer"]
            metrics["eval_utterances"] = listening["speech"]["n"]
            if model.cfg.get("lora"):  # the joint SFT conditions' LoRA, or mtbi.yaml's (model.lora=null: none)
                retention = evaluate_text_retention(model, files["retention"], seed_dir / name / "retention",
                                                    batch_size=batch_size, model_name=name, max_new_tokens=max_new_tokens)
                metrics["text_retention_rouge_l"] = retention["agreement_rouge_l"]
                metrics["text_retention_exact"] = retention["agreement_exact_match"]
            else:
                metrics["text_retention_rouge_l"] = metrics["text_retention_exact"] = 1.0  # no LoRA: the LLM is frozen
            write_json(paths[name], metrics)
            del model
    return {name: json.loads(path.read_text()) for name, path in paths.items()}


# --------------------------------------------------------------------------- report


def flat_metrics(m: dict) -> dict[str, float]:
    out = {}
    for split, s in m["splits"].items():
        out[f"{split}.rouge_l"] = s["rouge_l"]
        out[f"{split}.follows_task"] = s["follows_task"]
    for key in ("repeat_wer", "zero_audio_wer", "text_retention_rouge_l"):
        out[key] = m[key]
    return out


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Per condition and metric: per-seed values, mean, spread (max - min over seeds); then the
    named comparisons, each difference flagged when it exceeds both conditions' seed spread."""
    result = {}
    for name in CONDITIONS:
        runs = {seed: flat_metrics(m[name]) for seed, m in per_seed.items() if name in m}
        if not runs:
            continue
        stats = {}
        for key in next(iter(runs.values())):
            values = [r[key] for r in runs.values() if r[key] is not None and math.isfinite(r[key])]
            stats[key] = {"values": values, "mean": statistics.fmean(values) if values else None,
                          "spread": (max(values) - min(values)) if len(values) > 1 else None}
        result[name] = {"description": CONDITIONS[name].description, "seeds": sorted(runs), "metrics": stats}
    comparisons = []
    for a, b in COMPARISONS:
        if a not in result or b not in result:
            continue
        for key, sa in result[a]["metrics"].items():
            sb = result[b]["metrics"][key]
            if sa["mean"] is None or sb["mean"] is None:
                continue
            spreads = [s for s in (sa["spread"], sb["spread"]) if s is not None]
            diff = sa["mean"] - sb["mean"]
            beyond = (abs(diff) > max(spreads)) if len(spreads) == 2 else None
            comparisons.append({"condition": a, "baseline": b, "metric": key, "difference": diff,
                                "seed_spread": max(spreads) if spreads else None, "beyond_seed_spread": beyond})
    return {"conditions": result, "comparisons": comparisons}


def paired_comparisons(out: Path, seeds: list[int], conditions: list[str], benchmark: Path) -> list[dict]:
    """Each named comparison's ROUGE-L difference on the same benchmark items, per split, each item's difference
    averaged over the seeds, with a 95% interval over utterances (``benchmark.paired_difference``): with two
    seeds, "beyond the seed spread" compares two ranges of two numbers each; this uses every item of the
    ``benchmark`` manifest (a folder once benchmarked on more utterances keeps their answers), read as the
    benchmark reads it (:func:`eval_files` wrote and checked it), so the ids match its ``utt``.
    ``seeds`` of each comparison: the same difference on each seed's models alone (the pooled interval covers
    utterances, not training runs; a difference that one seed's models make and the other's do not shows here)."""
    utterances = {utterance_id(entry) for entry in read_manifest(benchmark)}
    runs = [[line for line in read_jsonl(out / f"seed{seed}" / "benchmark" / "predictions.jsonl") if line["utt"] in utterances]
            for seed in seeds]
    return [{"a": a, "b": b, "splits": {split: paired_difference(runs, a, b, split) for split in EVALUATION_SPLITS},
             "seeds": {str(seed): {split: paired_difference([run], a, b, split) for split in EVALUATION_SPLITS}
                       for seed, run in zip(seeds, runs)}}
            for a, b in COMPARISONS if a in conditions and b in conditions]


def _fmt(stat: dict, kind: str) -> str:
    if stat["mean"] is None:
        return "–"
    scale, unit = (100, "%") if kind in ("rate", "wer") else (1, "")
    digits = 0 if kind == "rate" else (1 if kind == "wer" else 3)
    text = f"{stat['mean'] * scale:.{digits}f}{unit}"
    if stat["spread"] is not None:
        text += f" ±{stat['spread'] * scale / 2:.{digits}f}"
    return text


def write_report(out: Path, summary: dict, run_info: dict) -> None:
    conds = summary["conditions"]
    lines = ["# Training objectives compared", "",
             f"Run: {run_info['steps']} stage-2 steps, batch {run_info['batch_size']}, seeds {run_info['seeds']}; "
             f"connector pre-alignment {run_info['ctc_steps']} CTC steps once per seed, shared by every condition. "
             f"Stage 2 trains {run_info['stage2_trains']}.",
             f"Benchmark: {run_info['benchmark_utterances']} held-out utterances x 1 prompt per task and split; "
             f"diagnostics and text retention: {run_info['eval_utterances']} utterances.",
             "Values: mean over seeds ± half the range (max - min) over seeds.", "",
             "## Benchmark: ROUGE-L against the text upper bound (task-following rate)", "",
             "| Condition | " + " | ".join(SPLIT_TITLES[s] for s in EVALUATION_SPLITS) + " |",
             "|---|" + "---:|" * len(EVALUATION_SPLITS)]
    for name, c in conds.items():
        m = c["metrics"]
        cells = [f"{_fmt(m[f'{s}.rouge_l'], 'score')} ({_fmt(m[f'{s}.follows_task'], 'rate')})" for s in EVALUATION_SPLITS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if run_info.get("upper_bound_follows_task"):
        ub = run_info["upper_bound_follows_task"]
        lines.append("| text upper bound | " + " | ".join(f"1.000 ({_fmt(ub[s], 'rate')})" for s in EVALUATION_SPLITS) + " |")
    lines += ["", "## Listening and text retention", "",
              "| Condition | held-out repeat WER | zero-audio WER (high = listens) | text retention ROUGE-L vs base LLM |",
              "|---|---:|---:|---:|"]
    for name, c in conds.items():
        m = c["metrics"]
        lines.append(f"| {name} | {_fmt(m['repeat_wer'], 'wer')} | {_fmt(m['zero_audio_wer'], 'wer')} | "
                     f"{_fmt(m['text_retention_rouge_l'], 'score')} |")
    lines += ["", "Conditions: " + "; ".join(f"`{n}`: {c['description']}" for n, c in conds.items()) + ".",
              "Text retention is 1 by construction where the LLM is frozen (no LoRA).", "",
              "## Differences larger than the seed spread", ""]
    beyond = [c for c in summary["comparisons"] if c["beyond_seed_spread"]]
    if len(run_info["seeds"]) < 2:
        lines.append("One seed only: no seed spread, no difference can be called larger than it.")
    elif not beyond:
        lines.append("None of the named comparisons differs by more than the seed spread.")
    for c in beyond:
        lines.append(f"- {c['condition']} vs {c['baseline']}, {c['metric']}: {c['difference']:+.3f} "
                     f"(seed spread {c['seed_spread']:.3f})")
    lines += ["", "## Benchmark differences on the same items, pooled over seeds", "",
              "ROUGE-L of the first condition minus the second on the benchmark items both answered, each item's "
              "difference averaged over the seeds, with a 95% interval from a bootstrap over utterances "
              "(docs/evaluation.md). An interval that excludes 0 is a difference these utterances tell apart."
              + few_utterances_caution(run_info["benchmark_utterances"]), "",
              "| Comparison | " + " | ".join(SPLIT_TITLES[s] for s in EVALUATION_SPLITS) + " |",
              "|---|" + "---:|" * len(EVALUATION_SPLITS)]
    for pair in summary["paired"]:
        cells = " | ".join(format_difference(pair["splits"][split]) for split in EVALUATION_SPLITS)
        lines.append(f"| {pair['a']} − {pair['b']} | {cells} |")
    if len(run_info["seeds"]) > 1:
        lines += ["", "## The same differences, seed by seed", "",
                  "Each seed's models alone (intervals over utterances again). The pooled interval above covers the "
                  "utterances, not the training runs: a difference every seed shows is one these objectives make, one "
                  "a single seed shows may be that seed's draw.", "",
                  "| Comparison | Seed | " + " | ".join(SPLIT_TITLES[s] for s in EVALUATION_SPLITS) + " |",
                  "|---|---:|" + "---:|" * len(EVALUATION_SPLITS)]
        for pair in summary["paired"]:
            for seed, splits in pair["seeds"].items():
                cells = " | ".join(format_difference(splits[split]) for split in EVALUATION_SPLITS)
                lines.append(f"| {pair['a']} − {pair['b']} | {seed} | {cells} |")
    lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["conditions"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(EVALUATION_SPLITS) * len(names) / 3), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        m = summary["conditions"][name]["metrics"]
        means = [m[f"{s}.rouge_l"]["mean"] or 0.0 for s in EVALUATION_SPLITS]
        errs = [(m[f"{s}.rouge_l"]["spread"] or 0.0) / 2 for s in EVALUATION_SPLITS]
        ax.bar([k + i * width for k in range(len(EVALUATION_SPLITS))], means, width, yerr=errs, label=name, capsize=2)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(EVALUATION_SPLITS))])
    ax.set_xticklabels([SPLIT_TITLES[s].split(" (")[0] for s in EVALUATION_SPLITS])
    ax.set_ylabel("ROUGE-L vs text upper bound")
    ax.legend(fontsize=7, ncol=min(len(names), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below: never over a bar
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- main


def estimate_minutes(steps: int, seeds: int, ctc_steps: int, items_per_model: int, eval_utterances: int,
                     base_lora: bool) -> float:
    per_seed = ctc_steps * S_PER_CTC_STEP
    for cond in CONDITIONS.values():
        per_seed += steps * S_PER_STEP * (KL_FACTOR if cond.kl else 1.0) * (LORA_FACTOR if cond.lora else 1.0)
        per_seed += (items_per_model + 3 * eval_utterances) * S_PER_ANSWER
        per_seed += 2 * eval_utterances * S_PER_ANSWER if cond.lora or base_lora else 0  # text retention
    per_seed += items_per_model * S_PER_ANSWER  # the text upper bound's references (each seed's benchmark folder)
    return seeds * per_seed / 60


def main(argv: list[str]) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--out", default=str(REPO / "compare_out"))
    p.add_argument("--data-dir", default=str(REPO / "demo_out"),
                   help="a demo output folder: corpus/, behaviors.jsonl, features/ (made there when missing)")
    p.add_argument("--features", default=None, help="feature cache folder (default: DATA_DIR/features)")
    p.add_argument("--steps", type=int, default=100, help="stage-2 training steps of every condition")
    p.add_argument("--seeds", type=int, default=2, help="seeds per condition (0, 1, ...)")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    p.add_argument("--freeze-connector", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the pre-aligned connector in stage 2 (default: as mtbi.yaml)")
    p.add_argument("--manifest", default=None, help="a real training manifest with word alignments (needs --heldout-manifest)")
    p.add_argument("--heldout-manifest", default=None)
    p.add_argument("--max-utterances", type=int, default=0,
                   help="train on the first N utterances of the behaviors only (0 = all; a quick trial run)")
    p.add_argument("--benchmark-utterances", type=int, default=32,
                   help="held-out utterances the benchmark answers (8 gave intervals excluding 0 for two differences "
                        "that 32 did not confirm: docs/objectives.md)")
    p.add_argument("--eval-utterances", type=int, default=16, help="held-out utterances for WER, zero audio and retention")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--batch-size", type=positive_int, default=64, help="generation batch (teacher and evaluation)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of nemo_speechlm/conf/mtbi.yaml")
    args = p.parse_intermixed_args(argv)
    if bool(args.manifest) != bool(args.heldout_manifest):
        p.error("--manifest and --heldout-manifest go together")
    start = time.time()
    out, data_dir = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = Path(args.features) if args.features else data_dir / "features"
    base = base_config(out, features, args.steps, args.overrides)

    stage("1/5 corpus and behaviors (reused from the data folder when there)")
    if args.manifest:
        manifests = {"train": Path(args.manifest), "heldout": Path(args.heldout_manifest)}
    elif (data_dir / "corpus" / "train_manifest.json").is_file():
        manifests = {"train": data_dir / "corpus" / "train_manifest.json",
                     "heldout": data_dir / "corpus" / "heldout_manifest.json"}
    else:
        manifests = load_demo().make_corpus(data_dir, 4800, 40, open_vocabulary=False)
    behaviors = data_dir / "behaviors.jsonl"
    if not behaviors.is_file():
        behaviors = load_demo().make_behaviors(data_dir, manifests["train"], base.model.pretrained_llm, 240,
                                               args.batch_size, 1200)
    print(f"train {manifests['train']}, held out {manifests['heldout']}, behaviors {behaviors}, features {features}")
    # a config key added by an upgrade since --out was written is no change at its packaged default
    check_run_settings(out, run_settings(base, manifests, behaviors, args), settings_file=out / "settings.json",
                       defaults={"config": recorded_config(base_config(out, features, args.steps, []))})
    data = condition_data(out, behaviors, base.model.pretrained_llm, args.batch_size, args.max_utterances)
    files = eval_files(out, manifests["heldout"], args.benchmark_utterances, args.eval_utterances)

    catalog = TaskCatalog.load()
    benchmark_utterances = min(args.benchmark_utterances, len(files["benchmark"].read_text().splitlines()))
    items = len([0 for s in EVALUATION_SPLITS for _ in catalog.evaluation_prompts(s, 1)]) * benchmark_utterances
    seeds = list(range(args.seeds))
    freeze = base.connector_pretraining.freeze_connector if args.freeze_connector is None else args.freeze_connector
    ctc_steps = base.connector_pretraining.steps
    minutes = estimate_minutes(args.steps, args.seeds, ctc_steps, items, args.eval_utterances, base.model.get("lora") is not None)
    print(f"estimate: ~{minutes:.0f} min on 2 CPU cores for {len(args.conditions)} conditions x {args.seeds} seeds x "
          f"{args.steps} steps (+ {ctc_steps} CTC steps per seed; {items} benchmark answers per model); "
          f"stage 2 trains {'the read-out gate and boundaries (connector frozen)' if freeze else 'the whole connector'}"
          f"{'' if base.model.get('lora') is None else ' and LoRA on the LLM'}")

    per_seed = {}
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        cfg = seed_config(base, seed, manifests["train"], args.freeze_connector)
        stage(f"2/5 seed {seed}: connector pre-alignment ({ctc_steps} CTC steps), shared by every condition")
        connector = align_connector(cfg, seed_dir / "aligned_connector.pt")
        nemos = {}
        stage(f"3/5 seed {seed}: stage 2 of each condition, {args.steps} steps")
        for name in tqdm(args.conditions, desc=f"Conditions (seed {seed})", unit="condition"):
            nemos[name] = train_condition(condition_config(cfg, name, data, connector, seed_dir), name, seed_dir)
        stage(f"4/5 seed {seed}: evaluation")
        per_seed[seed] = evaluate_seed(seed_dir, nemos, files, args.batch_size, args.max_new_tokens,
                                       evaluation_settings(args))

    stage("5/5 report")
    summary = {**summarize(per_seed), "paired": paired_comparisons(out, seeds, args.conditions, files["benchmark"])}
    first = per_seed[seeds[0]][args.conditions[0]]["splits"]
    run_info = {"steps": args.steps, "batch_size": base.data.train_ds.batch_size, "seeds": seeds, "ctc_steps": ctc_steps,
                "stage2_trains": ("the CTC read-out's gate and boundary vectors (~1k parameters; the connector is "
                                  "frozen after pre-alignment)" if freeze else "the whole connector")
                                 + ("" if base.model.get("lora") is None else ", plus LoRA (mtbi.yaml's; the joint SFT "
                                    "conditions their own)"),
                "freeze_connector": bool(freeze), "benchmark_utterances": benchmark_utterances,
                "eval_utterances": args.eval_utterances, "overrides": args.overrides, "estimate_minutes": round(minutes, 1),
                "upper_bound_follows_task": {s: {"mean": first[s]["upper_bound_follows_task"], "spread": None}
                                             for s in EVALUATION_SPLITS},
                "conditions": {n: vars(c) for n, c in CONDITIONS.items() if n in args.conditions},
                "minutes": round((time.time() - start) / 60, 1)}
    write_json(out / "results.json", {"run": run_info, **summary,
                                      "per_seed": {str(s): m for s, m in per_seed.items()}})
    write_report(out, summary, run_info)
    plot(out, summary)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    print(json.dumps({"minutes": round((time.time() - start) / 60, 1)}))


if __name__ == "__main__":
    run_cli(main)
