"""MTBI training data: a behaviors JSONL line -> a conversation, registered as ``type: mtbi_behaviors``.

A behaviors line is a manifest line (``audio_filepath``, ``duration``, ``text``, optional
``offset``/``words``) plus ``task``, ``prompt`` (with ``{input}`` where the utterance
goes) and ``response`` (the text LLM's answer to the transcript; written by
``examples/generate_behaviors.py``). The user turn is the prompt with the speech in place
of ``{input}``, or, for a share ``interleave.prob`` of lines, text and speech spans of the
utterance alternating (``nemo_speechlm.data.interleaving``). Each audio turn also
carries the text it stands for, so the KL teacher can read the same turn as text.

Data config keys: ``manifest_filepath`` (with ``tarred_audio_filepaths`` for a tarred manifest) or
``shar_path`` (``examples/to_shar.py``; see ``nemo_speechlm.data.sources``), ``interleave`` ({prob, text_span_words,
speech_span_words}), ``catalog`` (task catalog path; null = ``nemo_speechlm/conf/mtbi/tasks.yaml``),
``system_prompt``, ``seed``, ``skip_invalid``; ``audio_locator_tag``, ``token_equivalent_duration`` and
``speech_positions`` are filled in from the model.
"""
from __future__ import annotations

import random
from functools import partial

from lhotse.cut import Cut
from nemo.collections.common.data.lhotse import NeMoMultimodalConversation
from nemo.collections.common.data.lhotse.cutset import data_type_parser
from nemo.collections.common.data.lhotse.text_adapters import AudioTurn, TextTurn

from nemo_speechlm.data.conversations import ManifestConversations, entry_cut, finish_parsing, new_conversation, require_keys
from nemo_speechlm.data.interleaving import InterleaveConfig, choose_spans, validate_words
from nemo_speechlm.data.manifest import ManifestEntry, ManifestError
from nemo_speechlm.data.sources import LineSource
from nemo_speechlm.data.task_catalog import HELDOUT, INPUT_PLACEHOLDER, TaskCatalog
from nemo_speechlm.data.utterance import cut_id, speech_span
from nemo_speechlm.parts.metrics import plain_words

DATA_TYPE = "mtbi_behaviors"
BEHAVIOR_FIELDS = ("text", "task", "prompt", "response")


def behavior_to_conversation(
    entry: ManifestEntry,
    audio_locator_tag: str,
    token_equivalent_duration: float,
    catalog: TaskCatalog,
    interleave: InterleaveConfig = InterleaveConfig(),
    rng: random.Random | None = None,
    system_prompt: str | None = None,
    speech_positions: str = "frames",
) -> NeMoMultimodalConversation:
    """The training conversation of one behaviors line; errors name the file, line and field."""
    _check_behavior(entry, catalog)
    _check_teacher_system_prompt(entry, system_prompt)
    words = entry.get("words")
    if words is not None:
        try:
            validate_words(words, entry["duration"])
        except ValueError as e:
            raise ManifestError(entry.path, entry.line, str(e), "words") from None
    if interleave.prob > 0:  # on every pass, not only when this line's draw interleaves (an epoch in, training stopped)
        _check_words_for_interleaving(entry, words)
    rng = rng or random.Random(0)
    cut = entry_cut(entry, cut_id(entry))
    before, after = entry["prompt"].split(INPUT_PLACEHOLDER)
    if interleave.prob > 0 and rng.random() < interleave.prob:
        pieces = _interleaved_pieces(cut, words, interleave, rng, audio_locator_tag)
    else:
        pieces = [AudioTurn(cut=cut, role="user", audio_locator_tag=audio_locator_tag, text=entry["text"])]
    turns = [TextTurn(value=system_prompt, role="system")] if system_prompt else []
    turns += [t for t in [TextTurn(value=before, role="user"), *pieces, TextTurn(value=after, role="user")]
              if not (isinstance(t, TextTurn) and not t.value)]
    turns.append(TextTurn(value=entry["response"], role="assistant"))
    return new_conversation(cut.id, turns, token_equivalent_duration, speech_positions)


def _check_words_for_interleaving(entry: ManifestEntry, words: list[dict] | None) -> None:
    """Interleaving needs the line's words, and they must spell its transcript (up to case and punctuation): words
    left from before a corrected transcript gave the student and the KL teacher the old text."""
    if not words:
        raise ManifestError(
            entry.path, entry.line,
            "interleaving needs word alignments: add them with examples/align_words.py or set interleave.prob=0",
            "words",
        )
    spelled = plain_words(" ".join(str(w.get("word", "")) for w in words))
    if spelled != plain_words(entry["text"]):
        raise ManifestError(entry.path, entry.line, f"the words ({spelled[:60]!r}) do not spell the transcript "
                            f"({plain_words(entry['text'])[:60]!r}): align the corrected transcript again "
                            "(examples/align_words.py)", "words")


def _interleaved_pieces(utterance: Cut, words: list[dict], cfg: InterleaveConfig, rng: random.Random, tag: str) -> list:
    """Text runs as text, speech runs as time spans of the utterance, separated by single spaces. A speech run
    that lasts no time (an aligner clamping a word at the audio's end gives start == end) stays text: it has no
    audio to hear, and cutting it stopped training with a ValueError."""
    pieces = []
    for i, span in enumerate(choose_spans(words, cfg, rng)):
        sep = " " if i else ""
        if span.is_speech and min(span.end, utterance.duration) > span.start:  # (a word starting at the audio's
            # end, which validate_words allows by its tolerance, stopped training with a ValueError)
            if sep:
                pieces.append(TextTurn(value=sep, role="user"))
            pieces.append(AudioTurn(cut=speech_span(utterance, span.start, span.end), role="user", audio_locator_tag=tag, text=span.text))
        else:
            pieces.append(TextTurn(value=sep + span.text, role="user"))
    # Merge adjacent text so the conversation stays small.
    merged = []
    for p in pieces:
        if merged and isinstance(p, TextTurn) and isinstance(merged[-1], TextTurn):
            merged[-1] = TextTurn(value=merged[-1].value + p.value, role="user")
        else:
            merged.append(p)
    return merged


def _check_behavior(entry: ManifestEntry, catalog: TaskCatalog) -> None:
    task = entry["task"]
    if task not in catalog:
        raise ManifestError(entry.path, entry.line, f"unknown task {task!r}; the catalog {catalog.path} has {list(catalog.names)}", "task")
    if catalog.task(task).split == HELDOUT:
        raise ManifestError(entry.path, entry.line, f"task {task!r} is held out in {catalog.path}: it must not be trained on", "task")
    if entry.get("split") == HELDOUT:
        raise ManifestError(entry.path, entry.line, "the line is marked held out: it must not be trained on", "split")
    if catalog.is_heldout_prompt(entry["prompt"]):  # of any task, up to case and whitespace: it was this task's,
        # exactly (a trailing space, or the line naming another task, trained a held-out prompt)
        raise ManifestError(entry.path, entry.line, "this prompt is held out in the catalog: it must not be trained on", "prompt")
    if entry["prompt"].count(INPUT_PLACEHOLDER) != 1:
        raise ManifestError(entry.path, entry.line, f"the prompt must contain {INPUT_PLACEHOLDER} exactly once", "prompt")


def _check_teacher_system_prompt(entry: ManifestEntry, system_prompt: str | None) -> None:
    """The response is the LLM's answer under the system prompt it was generated with (``teacher.system_prompt``,
    recorded by ``generate_behaviors.py``); training under another one teaches the speech model to answer one
    instruction as the LLM answers another, and the KL teacher, reading the transcript under the training's,
    then pulls against the response. Lines without the record (hand-made, older files) are not checked."""
    teacher = entry.get("teacher")
    if not isinstance(teacher, dict) or teacher.get("source") != "llm" or "system_prompt" not in teacher:
        return
    if (teacher["system_prompt"] or None) != (system_prompt or None):
        raise ManifestError(
            entry.path, entry.line,
            f"the response was generated under system prompt {teacher['system_prompt']!r}, this training uses "
            f"{system_prompt!r} (the data config's system_prompt): set it to the behaviors' one, or generate the "
            "behaviors again with --system-prompt", "teacher",
        )


def _line_to_conversation(entry: ManifestEntry, iteration: int, seed: int, catalog_path: str | None, **kwargs):
    # Seeded per (seed, line, pass over the data): reproducible, yet new spans every epoch.
    rng = random.Random(f"{seed}-{entry.line}-{iteration}")
    return behavior_to_conversation(entry, catalog=_catalog(catalog_path), rng=rng, **kwargs)


_CATALOGS: dict = {}


def _catalog(path: str | None) -> TaskCatalog:
    if path not in _CATALOGS:
        _CATALOGS[path] = TaskCatalog.load(path)
    return _CATALOGS[path]


@data_type_parser(DATA_TYPE)
def read_mtbi_behaviors(config) -> tuple:
    """NeMo lhotse parser for ``type: mtbi_behaviors`` (keys in the module docstring)."""
    require_keys(config, DATA_TYPE, ("audio_locator_tag", "token_equivalent_duration"))
    build = partial(
        _line_to_conversation,
        seed=config.get("seed", 0),
        catalog_path=config.get("catalog"),
        audio_locator_tag=config.audio_locator_tag,
        token_equivalent_duration=config.token_equivalent_duration,
        interleave=InterleaveConfig.from_config(config.get("interleave")),
        system_prompt=config.get("system_prompt"),
        speech_positions=config.get("speech_positions", "frames"),
    )
    adapter = ManifestConversations(
        LineSource.from_config(config, DATA_TYPE), build, required_text_fields=BEHAVIOR_FIELDS, skip_invalid=config.get("skip_invalid", False)
    )
    return finish_parsing(config, adapter)
