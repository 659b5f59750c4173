"""The benchmark's reports from its metrics: ``results.md`` (markdown tables) and ``splits.png``."""
from __future__ import annotations

import math
from pathlib import Path

from nemo_speechlm.evaluation.benchmark_scoring import BOOTSTRAP_RESAMPLES, GT_METRICS, bootstrap_shortfall
from nemo_speechlm.evaluation.benchmark_systems import UPPER_BOUND

SPLIT_TITLES = {
    "seen_task_seen_prompt": "Seen task, seen prompt",
    "seen_task_heldout_prompt": "Seen task, held-out prompt (prompt generalization)",
    "heldout_task": "Held-out task (task generalization)",
}
_GT_LABELS = {"gt_wer": "WER vs ground truth", "gt_cer": "CER vs ground truth",
              "gt_bleu": "BLEU vs ground truth", "gt_chrf": "chrF vs ground truth"}


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
         ("transcript_copy", "transcript copy", "rate"), ("same_label", "same label as reference", "rate"),
         ("gt_wer", _GT_LABELS["gt_wer"], "wer"), ("gt_cer", _GT_LABELS["gt_cer"], "wer"),
         ("gt_bleu", _GT_LABELS["gt_bleu"], "score100"), ("gt_chrf", _GT_LABELS["gt_chrf"], "score100")]


def _interval(ci: list[float] | None, signed: bool = False) -> str:
    if not ci:
        return ""
    form = "{:+.3f}" if signed else "{:.3f}"
    return f" [{form.format(ci[0])}, {form.format(ci[1])}]"


def summary_table(metrics: dict) -> str:
    """Markdown: per split, each system's mean ROUGE-L vs the reference [95% interval] (task-following rate)."""
    systems = list(metrics["systems"])
    rows = [f"| Split | n | {' | '.join(systems)} |", "|---|---:|" + "---:|" * len(systems)]
    for split in metrics["config"]["splits"]:
        cells = []
        for system in systems:
            s = metrics["systems"][system]["splits"][split]["all"]
            ci = "" if system == UPPER_BOUND else _interval(s.get("rouge_l_ci"))  # the references themselves: 1.0
            cells.append(f"{_fmt(s['rouge_l'], 'score')}{ci} ({_fmt(s['follows_task'], 'rate')})")
        count = metrics["systems"][systems[0]]["splits"][split]["all"]["count"]
        rows.append(f"| {SPLIT_TITLES[split]} | {count} | {' | '.join(cells)} |")
    return "\n".join(rows)


def format_difference(pair: dict | None) -> str:
    """``+0.172 [+0.079, +0.269]`` for a ``paired_difference`` (no interval under 2 utterances; – for none)."""
    if pair is None or pair["rouge_l"] is None:
        return "–"
    return f"{pair['rouge_l']:+.3f}{_interval(pair['rouge_l_ci'], signed=True)}"


def differences_table(metrics: dict) -> str:
    """Markdown: per split and pair of systems, the mean ROUGE-L difference on the same items [95% interval]."""
    rows = ["| Split | Systems | n | ROUGE-L difference [95% interval] |", "|---|---|---:|---:|"]
    for split, pairs in metrics.get("differences", {}).items():
        for pair in pairs:
            systems = f"{pair['a']} − {pair['b']}"
            rows.append(f"| {SPLIT_TITLES[split]} | {systems} | {pair['count']} | {format_difference(pair)} |")
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
            if (key in GT_METRICS and name == "all") or key == "same_label":  # scored on a subset of the items
                metric_label += f" (n={summaries[0].get(f'{key}_count', 0)})"
            rows.append(f"| {head} | {metric_label} | {' | '.join(_fmt(s.get(key), kind) for s in summaries)} |")
            shown = True
        if name != "all" and summaries[0].get("transcript_copy_count") == 0 and summaries[0].get("count"):
            cells = " | ".join(_fmt(s.get("transcript_copy_where_expected"), "rate") for s in summaries)
            rows.append(f"|  |  | transcript copy (expected, not a failure) | {cells} |")
    return "\n".join(rows)


def _group(split_metrics: dict, name: str) -> dict:
    return split_metrics["all"] if name == "all" else split_metrics["tasks"].get(name, {})


# From here on (a shortfall under 6%) the caution is left out. A threshold on the shortfall itself dropped it at 29.
_ENOUGH_UTTERANCES = 30


def few_utterances_caution(utterances: int) -> str:
    """A sentence for reports over few utterances, whose bootstrap intervals are too narrow; '' from 30 on."""
    if not 2 <= utterances < _ENOUGH_UTTERANCES:
        return ""
    return (f" With {utterances} utterances these intervals are about {bootstrap_shortfall(utterances):.0%} narrower than a t "
            "interval on the same utterances: read an interval that only just excludes 0 as an indication; "
            "more utterances settle it.")


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
        "that only repeat the transcript (a failure, except for tasks that ask for it); *same label as "
        "reference* scores classification tasks on the label, where the reference names exactly one; "
        "ground-truth metrics are corpus-level against the manifest field named by the task.",
        "",
        "## Summary: mean ROUGE-L [95% interval] (task-following rate)",
        "",
        "Intervals come from a bootstrap over utterances (each resample draws utterances with all their answers, the "
        f"tasks and prompts as the catalog fixes them), {BOOTSTRAP_RESAMPLES} resamples.{few_utterances_caution(cfg['utterances'])}",
        "",
        summary_table(metrics),
    ]
    if any(metrics.get("differences", {}).values()):
        parts += ["", "## Paired differences between systems", "",
                  "Mean ROUGE-L of the first system minus the second on the items both answered, with the same "
                  "bootstrap over utterances. An interval that excludes 0 is a difference this benchmark can tell "
                  "apart from its sampling noise; one that spans 0 is not.", "", differences_table(metrics)]
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
