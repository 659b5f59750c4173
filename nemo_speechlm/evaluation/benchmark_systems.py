"""The systems the benchmark compares, as answer functions ``(items, token caps) -> texts``:

* each speech model (``.nemo``): the prompt with ``{input}`` replaced by the audio locator;
* ``cascade``: the text LLM on an ASR transcript;
* ``text_upper_bound``: the text LLM on the transcript; the text LLM is the first model's base
  LLM (:func:`~nemo_speechlm.models.base_llm.base_llm`, as in the text-retention evaluation).

Models load lazily (:class:`LazyModel`), so a fully cached rerun loads nothing.
"""
from __future__ import annotations

import gc
from typing import Any, Callable

from nemo_speechlm.data.audio import load_entry_audio
from nemo_speechlm.data.manifest import ManifestEntry
from nemo_speechlm.data.task_catalog import TaskCatalog
from nemo_speechlm.models.base_llm import base_llm

UPPER_BOUND = "text_upper_bound"
CASCADE = "cascade"
Answerer = Callable[[list[dict], list[int]], list[str]]  # (items, per-item token caps) -> answers


class LazyModel:
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


def audio_input(entry: ManifestEntry, sample_rate: int):
    """A path for whole files; the segment's waveform where the line has an ``offset``."""
    return load_entry_audio(entry, sample_rate) if "offset" in entry.data else entry["audio_filepath"]


def task_caps(items: list[dict], catalog: TaskCatalog, max_new_tokens: int) -> list[int]:
    """Each item's token cap: its task's own, within the run's ``max_new_tokens`` (one batch may mix caps)."""
    caps = [catalog.task(item["prompt"].task).max_new_tokens for item in items]
    return [min(max_new_tokens, cap or max_new_tokens) for cap in caps]


def text_answerer(model: LazyModel, texts: Callable[[dict], str], settings: dict):
    """Text LLM answers to the prompt rendered with ``texts(item)`` in place of ``{input}``."""

    def answer(items: list[dict], caps: list[int]) -> list[str]:
        m = model.get()
        prompts = [item["prompt"].render(texts(item)) for item in items]
        with base_llm(m):
            return m.respond([None] * len(items), prompts, max_new_tokens=caps, **settings)

    return answer


def speech_answerer(model: LazyModel, settings: dict):
    """Speech model answers: the prompt with the audio locator in place of ``{input}``."""

    def answer(items: list[dict], caps: list[int]) -> list[str]:
        m = model.get()
        prompts = [item["prompt"].render(m.audio_locator_tag) for item in items]
        audios = [audio_input(item["entry"], m.sampling_rate) for item in items]
        return m.respond(audios, prompts, max_new_tokens=caps, **settings)

    return answer
