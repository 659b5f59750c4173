"""Manifest line -> ``NeMoMultimodalConversation``, registered as a NeMo lhotse data type.

``type: speechlm_manifest`` in a dataloader ``input_cfg`` reads a NeMo manifest
(``audio_filepath``, ``duration``, ``text``, optional ``offset``/``prompt``; local JSONL, a tarred
manifest or Lhotse Shar, see :mod:`nemo_speechlm.data.sources`) and builds one user turn (prompt
text around the audio) and one assistant turn (the answer). Everything after that —
bucketing, weights, tokenization with the prompt format, audio collation — is NeMo's
lhotse dataloader and speechlm2's ``SALMDataset``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

from lhotse import CutSet, Recording, fastcopy
from lhotse.cut import Cut
from nemo.collections.common.data.lhotse import NeMoMultimodalConversation
from nemo.collections.common.data.lhotse.cutset import data_type_parser
from nemo.collections.common.data.lhotse.text_adapters import AudioTurn, TextTurn
from nemo.collections.common.data.prompt_fn import get_prompt_format_fn, registered_prompt_format_fn
from nemo.collections.common.prompts.formatter import PromptFormatter

from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary
from nemo_speechlm.data.sources import LineSource, naming_the_cut
from nemo_speechlm.data.utterance import cut_id
from nemo_speechlm.errors import InputError
from nemo_speechlm.modules.ctc_readout import readout_positions
from nemo_speechlm.parts.prompting import _hf_tokenizer, with_system_turn_for

log = logging.getLogger(__name__)

DATA_TYPE = "speechlm_manifest"
# How the sampler counts a speech turn's LLM positions (data config ``speech_positions``, filled in from the model):
# "frames": NeMo's duration / token_equivalent_duration (the connector's outputs go to the LLM as they are);
# "transcript": the CTC read-out's segments, one per transcript token, plus its two boundary vectors.
SPEECH_POSITIONS = ("frames", "transcript")


@dataclass
class ReadoutConversation(NeMoMultimodalConversation):
    """A conversation whose lengths count each speech turn as the CTC read-out feeds it to the LLM.

    NeMo counts a speech turn as ``duration / token_equivalent_duration`` positions: the connector's
    frames. With ``model.ctc_readout`` the LLM gets one position per transcript token (+2) instead,
    2.7x fewer on the demo's behaviors (10 against 28 per utterance), so bucketing on NeMo's count
    sorts by a length the LLM never sees (11.6% of the demo's positions stayed padding, against 4.7%
    with this count; docs/throughput.md). The transcript tokens are counted when the prompt format
    tokenizes the conversation, the one place the loader has the tokenizer; a speech turn without a
    transcript keeps NeMo's count."""

    speech_turn_positions: list | None = None  # per turn: read-out positions of a speech turn, else None

    @property
    def input_length(self) -> int | None:
        return None if self.context_ids is None else self.context_ids.shape[0] + self._speech_extra(0, -1)

    @property
    def output_length(self) -> int | None:
        return None if self.answer_ids is None else self.answer_ids.shape[0] + self._speech_extra(-1, None)

    @property
    def total_length(self) -> int | None:
        return None if self.input_ids is None else self.input_ids.shape[0] + self._speech_extra(0, None)

    def _speech_extra(self, start: int, stop: int | None) -> int:
        """Positions the speech turns in ``turns[start:stop]`` add beyond their locator token (which they replace)."""
        counted = self.speech_turn_positions or [None] * len(self.turns)
        return sum((n or math.ceil(t.cut.duration / self.token_equivalent_duration)) - 1
                   for t, n in zip(self.turns[start:stop], counted[start:stop]) if isinstance(t, AudioTurn))


def new_conversation(id: str, turns: list, token_equivalent_duration: float, speech_positions: str = "frames",
                     custom: dict | None = None) -> NeMoMultimodalConversation:
    """NeMo's conversation, or a :class:`ReadoutConversation` when ``speech_positions`` is "transcript"."""
    if speech_positions not in SPEECH_POSITIONS:
        raise ValueError(f"data config `speech_positions` must be one of {SPEECH_POSITIONS}, got {speech_positions!r}")
    cls = ReadoutConversation if speech_positions == "transcript" else NeMoMultimodalConversation
    return cls(id=id, turns=turns, token_equivalent_duration=token_equivalent_duration, custom=custom)


def split_prompt(prompt: str, audio_locator_tag: str) -> list[str]:
    """Split a prompt at its audio locators: ``"a <A> b"`` -> ``["a ", " b"]`` (one more piece than audios)."""
    return prompt.split(audio_locator_tag)


def cut_for_audio(audio_path: str, offset: float = 0.0, duration: float | None = None, cut_id: str | None = None) -> Cut:
    """A lhotse cut over a file, or over ``[offset, offset + duration)`` of it."""
    recording = Recording.from_file(audio_path, recording_id=cut_id or str(audio_path))
    cut = recording.to_cut()
    if offset or (duration is not None and duration < recording.duration):
        cut = cut.truncate(offset=offset, duration=min(duration or recording.duration, recording.duration - offset))
    if cut_id:
        cut.id = cut_id
    return cut


def entry_cut(entry: ManifestEntry, cut_id: str) -> Cut:
    """The cut of a line's audio: the archive's own (tarred manifest, Shar), else one over the file."""
    if entry.cut is not None:
        return fastcopy(entry.cut, id=cut_id)
    return cut_for_audio(entry["audio_filepath"], entry.get("offset", 0.0) or 0.0, entry["duration"], cut_id)


def build_user_turns(prompt: str, audio_cuts: list[Cut], audio_locator_tag: str, transcripts: list[str]) -> list:
    """User turns that alternate prompt text and audio in the order the locators appear."""
    pieces = split_prompt(prompt, audio_locator_tag)
    turns = []
    for i, piece in enumerate(pieces):
        if piece:
            turns.append(TextTurn(value=piece, role="user"))
        if i < len(audio_cuts):
            turns.append(
                AudioTurn(cut=audio_cuts[i], role="user", audio_locator_tag=audio_locator_tag, text=transcripts[i])
            )
    return turns


def entry_to_conversation(
    entry: ManifestEntry,
    default_prompt: str | None,
    audio_locator_tag: str,
    token_equivalent_duration: float,
    answer_field: str = "text",
    system_prompt: str | None = None,
    speech_positions: str = "frames",
) -> NeMoMultimodalConversation:
    """Build the training conversation for one manifest line; errors name the file and line."""
    prompt = entry.get("prompt") or default_prompt
    if not prompt:
        raise ManifestError(entry.path, entry.line, "no prompt: give a `prompt` field or a default `prompt` in the data config", "prompt")
    n_tags = prompt.count(audio_locator_tag)
    if n_tags != 1:
        raise ManifestError(
            entry.path,
            entry.line,
            f"the prompt must contain the audio locator {audio_locator_tag!r} exactly once for the line's one audio "
            f"file, found {n_tags}: {prompt!r}",
            "prompt",
        )
    answer = entry.get(answer_field)
    if not isinstance(answer, str) or not answer.strip():
        raise ManifestError(entry.path, entry.line, f"missing or empty answer (got {answer!r})", answer_field)
    cut = entry_cut(entry, cut_id(entry))
    turns = build_user_turns(prompt, [cut], audio_locator_tag, [entry.get("text", "")])
    turns.append(TextTurn(value=answer, role="assistant"))
    system = entry.get("system_prompt") or system_prompt
    if system:
        turns.insert(0, TextTurn(value=system, role="system"))
    return new_conversation(cut.id, turns, token_equivalent_duration, speech_positions)


class ManifestConversations:
    """Lazily iterates a data source's lines as conversations (picklable, so it runs in dataloader workers).

    ``to_conversation(entry, iteration)`` builds one conversation per line; ``iteration``
    counts passes over the data so random choices (interleaving spans) differ per epoch. Local
    audio files are checked until one pass has read every line (``nemo_speechlm.data.sources``); the lines it
    skipped stay skipped: later passes, trusting the check, used to train on them (a missing file's line failed
    the epoch; a line whose duration was wrong trained on a cut of its audio under the whole transcript).
    """

    def __init__(
        self,
        source: LineSource,
        to_conversation: Callable[[ManifestEntry, int], NeMoMultimodalConversation],
        required_text_fields: tuple[str, ...] = (),
        skip_invalid: bool = False,
        has_audio: bool = True,
    ) -> None:
        self.source = source
        self.to_conversation = to_conversation
        self.required_text_fields = required_text_fields
        self.skip_invalid = skip_invalid
        # False for lines without exactly one `audio_filepath` (text-only, or several audios that
        # ``to_conversation`` validates itself).
        self.has_audio = has_audio
        self.summary = SkipSummary()
        self.iteration = 0
        self._audio_checked = False  # a pass has read every line with its audio checked

    def __iter__(self) -> Iterator[NeMoMultimodalConversation]:
        self.iteration += 1
        checking = not self._audio_checked
        skipped_before = self.summary.lines if not checking and not self.source.is_archive else ()
        # (archive lines are named by their position in this pass's shard order, and checked on every pass)
        yielded = 0
        for entry in self.source.entries(
            required_text_fields=self.required_text_fields,
            has_audio=self.has_audio,
            check_audio=checking,
            skip_invalid=self.skip_invalid,
            summary=self.summary,
            epoch=self.iteration - 1,
        ):
            if (entry.path, entry.line) in skipped_before:
                continue
            try:
                yield self.to_conversation(entry, self.iteration)
            except ManifestError as e:
                if entry.cut is not None and self.source.is_archive:
                    e = naming_the_cut(e, entry.cut)
                if not self.skip_invalid:
                    raise e from None
                if self.summary.add(e):  # as read_manifest says it of the lines it skips, once per line
                    log.warning("Skipping %s", e)
            else:
                yielded += 1
        if checking and not yielded and self.summary.total:  # a source of the mix would vanish without a word
            raise InputError(f"{self.source.name}: every line was skipped as invalid ({self.summary})",
                             "fix the lines, or remove this input from the data config")
        self._audio_checked = True


def finish_parsing(config, adapter: ManifestConversations) -> tuple[CutSet, bool]:
    """A lazy, endless (unless ``force_finite``) CutSet over ``adapter`` for NeMo's lhotse loader."""
    cuts = CutSet(adapter)
    if not config.get("force_finite", False):
        cuts = cuts.repeat()
    return cuts, True


def require_keys(config, data_type: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if config.get(key) is None:
            raise ValueError(f"Data config of type {data_type!r} needs `{key}` (got {dict(config)}).")


@registered_prompt_format_fn(NeMoMultimodalConversation, PromptFormatter)
def concatenate_turns_prompt_fn(example: NeMoMultimodalConversation, formatter: PromptFormatter, **kwargs):
    """Consecutive same-role turns are concatenated exactly (NeMo's default inserts a space),
    so the text around an audio locator is what the prompt says, as at inference time and in the KL
    teacher's text. For every formatter: the LLM's chat template and NeMo's named ones (``model.prompt_format``,
    which trained with two spaces around each locator until 2026-12-07), except where NeMo registers its own for a
    formatter (speechlm2: ``llama2``)."""
    turns = []
    for turn in example.turns:
        piece = turn.value if isinstance(turn, TextTurn) else turn.audio_locator_tag
        if turns and turns[-1]["role"] == turn.role:
            turns[-1]["slots"]["message"] += piece
        else:
            turns.append({"role": turn.role, "slots": {"message": piece}})
    return formatter.encode_dialog(with_system_turn_for(formatter, turns), **kwargs)


@registered_prompt_format_fn(ReadoutConversation)
def readout_conversation_prompt_fn(example: ReadoutConversation, formatter, **kwargs):
    """Whatever prompt function the formatter uses for NeMo's conversations, plus the read-out
    positions of each speech turn (``ReadoutConversation.speech_turn_positions``)."""
    encoded = get_prompt_format_fn(NeMoMultimodalConversation, formatter)(example, formatter, **kwargs)
    tokenizer = _hf_tokenizer(formatter.tokenizer)
    encoded["speech_turn_positions"] = [readout_positions(tokenizer, t.text) if isinstance(t, AudioTurn) and t.text else None
                                        for t in example.turns]
    return encoded


@data_type_parser(DATA_TYPE)
def read_speechlm_manifest(config) -> tuple[CutSet, bool]:
    """NeMo lhotse parser for ``type: speechlm_manifest`` (see module docstring for the keys)."""
    require_keys(config, DATA_TYPE, ("audio_locator_tag", "token_equivalent_duration"))
    build = partial(
        _line_to_conversation,
        default_prompt=config.get("prompt"),
        audio_locator_tag=config.audio_locator_tag,
        token_equivalent_duration=config.token_equivalent_duration,
        answer_field=config.get("answer_field", "text"),
        system_prompt=config.get("system_prompt"),
        speech_positions=config.get("speech_positions", "frames"),
    )
    source = LineSource.from_config(config, DATA_TYPE)
    return finish_parsing(config, ManifestConversations(source, build, skip_invalid=config.get("skip_invalid", False)))


def _line_to_conversation(entry: ManifestEntry, iteration: int, **kwargs) -> NeMoMultimodalConversation:
    return entry_to_conversation(entry, **kwargs)
