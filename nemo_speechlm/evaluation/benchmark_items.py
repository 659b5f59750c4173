"""The benchmark's items: held-out utterance x evaluation prompt, per catalog split; and what a
task's right answer is made of (its ground truth; whether copying the transcript is right)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nemo_speechlm.data.manifest import ManifestEntry, SkipSummary, read_manifest
from nemo_speechlm.data.task_catalog import EVALUATION_SPLITS, Task, TaskCatalog
from nemo_speechlm.data.utterance import utterance_id

TRANSCRIPT_FIELD = "text"


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
