"""The MTBI task catalog: tasks, prompt paraphrases and their fixed train/heldout split.

Behavior generation draws training prompts from here, and the benchmark draws its
three evaluation splits from here, so both sides agree on which prompts and tasks
were never trained on. The catalog is a YAML file (``nemo_speechlm/conf/mtbi/tasks.yaml`` documents
the schema); everything is validated on load with errors that name the file, the
line, the task and the field.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from nemo_speechlm.errors import InputError

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "conf" / "mtbi" / "tasks.yaml"
INPUT_PLACEHOLDER = "{input}"

TRAIN, HELDOUT = "train", "heldout"
SPLITS = (TRAIN, HELDOUT)

# The benchmark's three splits: what training saw, prompt generalization, task generalization.
SEEN_TASK_SEEN_PROMPT = "seen_task_seen_prompt"
SEEN_TASK_HELDOUT_PROMPT = "seen_task_heldout_prompt"
HELDOUT_TASK = "heldout_task"
EVALUATION_SPLITS = (SEEN_TASK_SEEN_PROMPT, SEEN_TASK_HELDOUT_PROMPT, HELDOUT_TASK)

GROUND_TRUTH_METRICS = ("wer", "cer", "bleu", "chrf")

_TOP_KEYS = {"tasks"}
_TASK_KEYS = {"split", "description", "check", "ground_truth", "max_new_tokens", "prompts"}
_REQUIRED_TASK_KEYS = {"split", "description", "check", "prompts"}
_PROMPT_KEYS = {"text", "split"}
_GROUND_TRUTH_KEYS = {"field", "metric"}
_TASK_NAME = re.compile(r"[a-z][a-z0-9_]*")


class TaskCatalogError(InputError):
    """The catalog file is malformed; the message names the file, the line, the task and the field."""


class UnknownTaskError(KeyError, InputError):
    """A task name that the catalog does not have (caught as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt paraphrase; ``index`` is its position in the task's prompt list."""

    task: str
    index: int
    text: str
    split: str

    @property
    def id(self) -> str:
        """Stable id (``summarize/3``) to store in behavior manifests and results."""
        return f"{self.task}/{self.index}"

    def render(self, input_text: str) -> str:
        return render_prompt(self.text, input_text)


@dataclass(frozen=True)
class GroundTruth:
    """Manifest field that a task's answers are also scored against, and how."""

    field: str
    metric: str


@dataclass(frozen=True)
class Task:
    name: str
    split: str
    description: str
    check: dict  # {"name": ..., **params}, the spec for task_checks.run_check
    ground_truth: GroundTruth | None
    max_new_tokens: int | None
    prompts: tuple[TaskPrompt, ...]

    def prompts_in(self, split: str) -> list[TaskPrompt]:
        return [p for p in self.prompts if p.split == split]


def render_prompt(prompt_text: str, input_text: str) -> str:
    """Put the transcript (or an audio locator) where ``{input}`` is.

    ``str.replace``, not ``str.format``: transcripts may contain braces.
    """
    count = prompt_text.count(INPUT_PLACEHOLDER)
    if count != 1:
        raise ValueError(f"prompt must contain {INPUT_PLACEHOLDER} exactly once, found {count}: {prompt_text!r}")
    return prompt_text.replace(INPUT_PLACEHOLDER, input_text)


def _rng(*parts: Any) -> random.Random:
    """A generator seeded from ``parts`` alone (not Python's salted ``hash``), so reruns agree."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def prompt_key(text: str) -> str:
    """A prompt's text as the catalog compares prompts: lower case, runs of whitespace as one space."""
    return " ".join(text.lower().split())


class TaskCatalog:
    """Tasks in file order. Build with :meth:`load`; all methods are pure and deterministic."""

    def __init__(self, tasks: Iterable[Task], path: str | Path | None = None):
        self._tasks = {t.name: t for t in tasks}
        self.path = Path(path) if path is not None else None
        self._heldout_keys: frozenset[str] | None = None

    def is_heldout_prompt(self, text: str) -> bool:
        """Whether ``text`` is, up to case and whitespace, a held-out prompt of any task (a held-out task's prompts
        all are): training on it would leak it into the benchmark's held-out splits whatever task a line names."""
        if self._heldout_keys is None:
            self._heldout_keys = frozenset(prompt_key(p.text) for t in self for p in t.prompts
                                           if t.split == HELDOUT or p.split == HELDOUT)
        return prompt_key(text) in self._heldout_keys

    @classmethod
    def load(cls, path: str | Path | None = None) -> "TaskCatalog":
        """Read and validate a catalog file (default: the shipped ``nemo_speechlm/conf/mtbi/tasks.yaml``)."""
        path = Path(path) if path is not None else DEFAULT_CATALOG
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_LineLoader)
        except OSError as e:
            raise TaskCatalogError(f"{path}: cannot read the task catalog: {e}") from e
        except yaml.YAMLError as e:
            raise TaskCatalogError(f"{path}: not valid YAML: {e}") from e
        return cls(_parse_catalog(data, path), path)

    # ----------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    @property
    def training_tasks(self) -> list[Task]:
        return [t for t in self if t.split == TRAIN]

    @property
    def heldout_tasks(self) -> list[Task]:
        return [t for t in self if t.split == HELDOUT]

    def task(self, name: str) -> Task:
        if name not in self._tasks:
            where = f" in {self.path}" if self.path else ""
            raise UnknownTaskError(f"unknown task {name!r}{where}; known tasks: {', '.join(self._tasks)}")
        return self._tasks[name]

    def select(self, names: Iterable[str]) -> "TaskCatalog":
        """A catalog with only ``names`` (kept in file order), e.g. from a ``tasks:`` config list."""
        wanted = list(names)
        if not wanted:
            raise ValueError("select() needs at least one task name")
        for name in wanted:
            self.task(name)
        return TaskCatalog((t for t in self if t.name in set(wanted)), self.path)

    # ----------------------------------------------------------------- splits
    def training_prompts(self) -> list[TaskPrompt]:
        """Every prompt that training may see: train prompts of train tasks."""
        return [p for t in self.training_tasks for p in t.prompts_in(TRAIN)]

    def evaluation_split(self, prompt: TaskPrompt) -> str:
        """Which benchmark split a prompt belongs to."""
        if self.task(prompt.task).split == HELDOUT:
            return HELDOUT_TASK
        return SEEN_TASK_HELDOUT_PROMPT if prompt.split == HELDOUT else SEEN_TASK_SEEN_PROMPT

    def evaluation_prompts(
        self, split: str, prompts_per_task: int | None = None, seed: int = 0
    ) -> list[TaskPrompt]:
        """The prompts of one benchmark split; ``prompts_per_task`` keeps at most that many
        per task, drawn deterministically from ``seed``."""
        if split not in EVALUATION_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; expected one of {', '.join(EVALUATION_SPLITS)}")
        chosen = []
        for task in self:
            prompts = [p for p in task.prompts if self.evaluation_split(p) == split]
            if prompts_per_task is not None and len(prompts) > prompts_per_task:
                picked = _rng("evaluation", seed, split, task.name).sample(prompts, prompts_per_task)
                prompts = sorted(picked, key=lambda p: p.index)
            chosen.extend(prompts)
        return chosen

    def sample_training_prompts(
        self, utt_id: str, tasks_per_utterance: int, prompts_per_task: int, seed: int = 0
    ) -> list[TaskPrompt]:
        """Training prompts for one utterance: distinct train tasks, up to ``prompts_per_task`` distinct
        train prompts each (all of a task's train prompts where it has fewer, e.g. a task trained on the
        bare ``{input}`` alone: docs/connector.md).

        Depends only on (catalog, utt_id, seed, counts), so a resumed behavior-generation
        job picks the same prompts for the same utterance.
        """
        tasks = self.training_tasks
        if not tasks:
            raise ValueError(f"task catalog {self.path or ''} has no train tasks to sample from")
        if not 1 <= tasks_per_utterance <= len(tasks):
            raise ValueError(f"tasks_per_utterance must be in 1..{len(tasks)} (train tasks), got {tasks_per_utterance}")
        most = max(len(t.prompts_in(TRAIN)) for t in tasks)
        if not 1 <= prompts_per_task <= most:
            raise ValueError(
                f"prompts_per_task must be in 1..{most} (most train prompts of a train task), got {prompts_per_task}"
            )
        rng = _rng("train", seed, utt_id)
        chosen = []
        for task in rng.sample(tasks, tasks_per_utterance):
            prompts = task.prompts_in(TRAIN)
            chosen.extend(rng.sample(prompts, min(prompts_per_task, len(prompts))))
        return chosen


# --------------------------------------------------------------------- parsing
class _Mapping(dict):
    """A YAML mapping that remembers its line, for error messages."""

    line: int = 0


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records mapping lines and rejects duplicate keys (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    mapping = _Mapping(loader.construct_pairs(node, deep=True))
    mapping.line = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _error(path: Path, node: Any, problem: str, task: str | None = None, field: str | None = None) -> TaskCatalogError:
    where = f"{path}:{node.line}" if getattr(node, "line", 0) else str(path)
    if task is not None:
        where += f" task '{task}'"
    if field is not None:
        where += f" field '{field}'"
    return TaskCatalogError(f"{where}: {problem}")


def _check_keys(path: Path, node: dict, allowed: set, required: set, task: str | None, what: str) -> None:
    unknown = sorted(set(node) - allowed, key=str)
    if unknown:
        raise _error(path, node, f"unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}", task)
    missing = sorted(required - set(node))
    if missing:
        raise _error(path, node, f"missing key(s) {missing} in {what}", task)


def _parse_catalog(data: Any, path: Path) -> list[Task]:
    if not isinstance(data, dict):
        raise _error(path, data, "expected a mapping with a 'tasks' key at the top level")
    _check_keys(path, data, _TOP_KEYS, _TOP_KEYS, None, "the top level")
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise _error(path, data, "expected a non-empty mapping of task name -> task", field="tasks")
    return [_parse_task(path, name, node) for name, node in tasks.items()]


def _parse_task(path: Path, name: Any, node: Any) -> Task:
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise _error(path, node, f"task names must match {_TASK_NAME.pattern}, got {name!r}")
    if not isinstance(node, dict):
        raise _error(path, node, f"expected a mapping with keys {sorted(_TASK_KEYS)}, got {node!r}", name)
    _check_keys(path, node, _TASK_KEYS, _REQUIRED_TASK_KEYS, name, "a task")
    split = node["split"]
    if split not in SPLITS:
        raise _error(path, node, f"expected train or heldout, got {split!r}", name, "split")
    description = node["description"]
    if not isinstance(description, str) or not description.strip():
        raise _error(path, node, "expected a non-empty string", name, "description")
    max_new_tokens = node.get("max_new_tokens")
    if max_new_tokens is not None and (type(max_new_tokens) is not int or max_new_tokens < 1):
        raise _error(path, node, f"expected a positive integer or null, got {max_new_tokens!r}", name, "max_new_tokens")
    prompts = _parse_prompts(path, name, node)
    _check_prompt_split(path, name, split, node, prompts)
    return Task(
        name=name,
        split=split,
        description=description.strip(),
        check=_parse_check(path, name, node),
        ground_truth=_parse_ground_truth(path, name, node),
        max_new_tokens=max_new_tokens,
        prompts=tuple(prompts),
    )


def _parse_prompts(path: Path, task: str, node: dict) -> list[TaskPrompt]:
    items = node["prompts"]
    if not isinstance(items, list) or not items:
        raise _error(path, node, "expected a non-empty list of {text: ..., split: train|heldout}", task, "prompts")
    prompts, seen = [], {}
    for index, item in enumerate(items):
        field = f"prompts[{index}]"
        if not isinstance(item, dict):
            raise _error(path, node, f"expected a mapping {{text: ..., split: ...}}, got {item!r}", task, field)
        _check_keys(path, item, _PROMPT_KEYS, _PROMPT_KEYS, task, field)
        text, split = item["text"], item["split"]
        if split not in SPLITS:
            raise _error(path, item, f"expected train or heldout, got {split!r}", task, f"{field}.split")
        if not isinstance(text, str):
            raise _error(path, item, f"expected a string, got {text!r}", task, f"{field}.text")
        count = text.count(INPUT_PLACEHOLDER)
        if count != 1:
            raise _error(path, item, f"must contain {INPUT_PLACEHOLDER} exactly once, found {count}", task, f"{field}.text")
        if "{" in text.replace(INPUT_PLACEHOLDER, "") or "}" in text.replace(INPUT_PLACEHOLDER, ""):
            raise _error(path, item, f"braces other than {INPUT_PLACEHOLDER} are not allowed", task, f"{field}.text")
        key = prompt_key(text)
        if key in seen:
            raise _error(path, item, f"duplicate of prompts[{seen[key]}]", task, f"{field}.text")
        seen[key] = index
        prompts.append(TaskPrompt(task=task, index=index, text=text, split=split))
    return prompts


def _check_prompt_split(path: Path, task: str, split: str, node: dict, prompts: list[TaskPrompt]) -> None:
    """Train tasks need train prompts (to learn) and heldout prompts (prompt generalization);
    a heldout task must never be trained on."""
    n_train = sum(p.split == TRAIN for p in prompts)
    if split == HELDOUT and n_train:
        raise _error(path, node, f"a heldout task has {n_train} prompt(s) marked train; mark them heldout", task, "prompts")
    if split == TRAIN and n_train == 0:
        raise _error(path, node, "a train task needs at least one train prompt", task, "prompts")
    if split == TRAIN and n_train == len(prompts):
        raise _error(path, node, "a train task needs at least one heldout prompt (prompt generalization)", task, "prompts")


def _parse_check(path: Path, task: str, node: dict) -> dict:
    spec = node["check"]
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _error(path, node, f"expected a check name or {{name: ..., <params>}}, got {spec!r}", task, "check")
    spec = dict(spec)
    resolve_check = _check_resolver()
    if resolve_check is not None:
        try:
            resolve_check(spec)  # unknown name or bad parameters fail here, not mid-evaluation
        except ValueError as e:
            raise _error(path, node, str(e), task, "check") from e
    return spec


def _check_resolver():
    """``task_checks.resolve_check``, imported late: the catalog must load (for behavior
    generation) even where the evaluation package is absent; then checks go unvalidated."""
    try:
        from nemo_speechlm.data.task_checks import resolve_check
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("nemo_speechlm.evaluation"):
            return None
        raise
    return resolve_check


def _parse_ground_truth(path: Path, task: str, node: dict) -> GroundTruth | None:
    spec = node.get("ground_truth")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise _error(path, node, f"expected null or {{field: ..., metric: ...}}, got {spec!r}", task, "ground_truth")
    _check_keys(path, spec, _GROUND_TRUTH_KEYS, _GROUND_TRUTH_KEYS, task, "ground_truth")
    if not isinstance(spec["field"], str) or not spec["field"]:
        raise _error(path, spec, f"expected a manifest field name, got {spec['field']!r}", task, "ground_truth.field")
    if spec["metric"] not in GROUND_TRUTH_METRICS:
        raise _error(
            path, spec, f"expected one of {', '.join(GROUND_TRUTH_METRICS)}, got {spec['metric']!r}",
            task, "ground_truth.metric",
        )
    return GroundTruth(field=spec["field"], metric=spec["metric"])
