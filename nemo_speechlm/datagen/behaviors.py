"""MTBI behavior generation: the text LLM answers each transcript under task prompts.

One item per (utterance, task, prompt): the prompts of each utterance are drawn from the
catalog's *training* prompts of *training* tasks (held-out tasks and prompts never get
training behaviors), deterministically per utterance, so a resumed job asks the same
questions. The job itself is a small ``process_batch`` for the shared resumable runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from nemo_speechlm.data.manifest import ManifestError, SkipSummary, data_for_output, read_manifest
from nemo_speechlm.data.task_catalog import TaskCatalog
from nemo_speechlm.data.utterance import portable_utterance_id, utterance_id
from nemo_speechlm.datagen.chat_generator import ChatGenerator
from nemo_speechlm.datagen.filters import degenerate_reason
from nemo_speechlm.errors import InputError
from nemo_speechlm.parts.metrics import is_transcript_copy
from nemo_speechlm.parts.runner import Job, Outcome, Rejected

# Manifest fields copied into each behavior line (plus anything else the line has).
_RESERVED = ("key", "task", "prompt", "prompt_id", "response", "split", "teacher")


def behavior_items(
    manifest: str | Path,
    catalog: TaskCatalog,
    tasks_per_utterance: int,
    prompts_per_task: int,
    seed: int = 0,
    skip_invalid: bool = False,
    summary: SkipSummary | None = None,
    output_path: str | Path | None = None,
) -> Iterator[dict]:
    """Items ``{"key", "entry", "fields", "prompt": TaskPrompt}`` for every utterance of ``manifest``.

    ``fields``: the line as the behaviors file at ``output_path`` holds it (a relative audio path stays
    relative, to that file's directory: ``data_for_output``); the key names the audio the same way, so
    a folder moved with its audio resumes."""
    n_tasks = min(tasks_per_utterance, len(catalog.training_tasks))
    for entry in read_manifest(manifest, skip_invalid=skip_invalid, summary=summary):
        fields = data_for_output(entry, output_path)
        utt_id = utterance_id(fields)
        prompts = catalog.sample_training_prompts(portable_utterance_id(entry), n_tasks, prompts_per_task, seed=seed)
        for prompt in prompts:
            yield {"key": f"{utt_id}|{prompt.id}", "entry": entry, "fields": fields, "prompt": prompt}


def behavior_job(
    generator: ChatGenerator,
    catalog: TaskCatalog,
    max_new_tokens: int,
    system_prompt: str | None = None,
    ground_truth_tasks: tuple[str, ...] = (),
) -> Job:
    """``process_batch`` for the runner: ask the LLM, reject degenerate answers, write behavior lines.
    Its settings (teacher, decoding, caps, ground-truth tasks) are checked when an output is resumed.

    ``ground_truth_tasks`` take the task's ground-truth field (e.g. the transcript for
    ``repeat``) as the response instead of the LLM's answer: small teachers paraphrase
    when asked to repeat, and a repeat behavior should be the words said.
    """
    check_ground_truth_tasks(catalog, ground_truth_tasks)
    settings = {**generator.generation_settings(), "max_new_tokens": max_new_tokens, "system_prompt": system_prompt}

    def process(items: list[dict]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        asked, caps = [], []  # items for the LLM, each with its task's cap (one batch mixes caps)
        for i, item in enumerate(items):
            task = catalog.task(item["prompt"].task)
            if task.name in ground_truth_tasks:
                field, entry = task.ground_truth.field, item["entry"]
                if not isinstance(entry.get(field), str) or not entry[field].strip():  # was a bare KeyError
                    raise ManifestError(entry.path, entry.line, f"missing or empty: task {task.name!r} takes its "
                                        "response from this field (--ground-truth-tasks)", field)
                outcomes[i] = _record(item, entry[field], {"source": "ground_truth", "field": field})
                continue
            asked.append(i)
            caps.append(min(max_new_tokens, task.max_new_tokens or max_new_tokens))
        results = generator.generate([_messages(items[i], system_prompt) for i in asked], max_new_tokens=caps) if asked else []
        for i, cap, result in zip(asked, caps, results):
            item = items[i]
            rendered = item["prompt"].render(item["entry"]["text"])
            reason = degenerate_reason(result.text, rendered, result.finished, transcript=item["entry"]["text"])
            if reason is None and catalog.task(item["prompt"].task).check["name"] == "differs_from_input" \
                    and is_transcript_copy(result.text, item["entry"]["text"]):
                # the teacher echoed the speech for a task that must not (paraphrase, continue, reply): the very
                # habit reply exists to cure; the filter could not see it (reply's prompt is the transcript itself)
                reason = "copies_transcript"
            if reason:
                outcomes[i] = Rejected(reason, result.text[:200])
            else:
                outcomes[i] = _record(item, result.text, {**settings, "max_new_tokens": cap, "source": "llm"})
        return outcomes

    # the catalog's part in an answer (each task's cap, each prompt's words): edited, it was resumed into, mixing
    # answers made under two caps; an output written before it was recorded is taken as made under this one
    asked_by = {"task_caps": {t.name: t.max_new_tokens for t in catalog},
                "prompts": {p.id: p.text for t in catalog for p in t.prompts}}
    return Job(process, {**settings, "ground_truth_tasks": sorted(ground_truth_tasks), **asked_by}, ("response",),
               lambda item: {"text": item["fields"].get("text")},  # a corrected transcript is answered anew
               settings_defaults=asked_by)


def check_ground_truth_tasks(catalog: TaskCatalog, names) -> None:
    """Each ``--ground-truth-tasks`` name is a task of ``catalog`` with a ground truth: a misspelled one was ignored
    (its task asked of the LLM, and the name recorded as if used). Checked before any model loads."""
    for name in names:
        if name not in catalog:
            raise InputError(f"--ground-truth-tasks: unknown task {name!r}; the tasks are {', '.join(catalog.names)}")
        if catalog.task(name).ground_truth is None:
            raise InputError(f"--ground-truth-tasks: task {name!r} has no ground_truth in {catalog.path}; it cannot take "
                             "one as response")


def _messages(item: dict, system_prompt: str | None) -> list[dict]:
    user = {"role": "user", "content": item["prompt"].render(item["entry"]["text"])}
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [user]


def _record(item: dict, response: str, teacher: dict) -> dict:
    prompt = item["prompt"]
    fields = {k: v for k, v in item["fields"].items() if k not in _RESERVED}
    return {
        **fields,
        "key": item["key"],
        "task": prompt.task,
        "prompt": prompt.text,
        "prompt_id": prompt.id,
        "split": prompt.split,
        "response": response,
        "teacher": teacher,
    }
