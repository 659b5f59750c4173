"""Manifest line -> ``NeMoMultimodalConversation``, registered as a NeMo lhotse data type.

``type: speechlm_manifest`` in a dataloader ``input_cfg`` reads a NeMo manifest
(``audio_filepath``, ``duration``, ``text``, optional ``offset``/``prompt``) through
:func:`~nemo_speechlm.data.manifest.read_manifest` and builds one user turn (prompt
text around the audio) and one assistant turn (the answer). Everything after that —
bucketing, weights, tokenization with the prompt format, audio collation — is NeMo's
lhotse dataloader and speechlm2's ``SALMDataset``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lhotse import CutSet, Recording
from lhotse.cut import Cut
from nemo.collections.common.data.lhotse import NeMoMultimodalConversation
from nemo.collections.common.data.lhotse.cutset import data_type_parser
from nemo.collections.common.data.lhotse.text_adapters import AudioTurn, TextTurn

from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary, read_manifest

DATA_TYPE = "speechlm_manifest"


def split_prompt(prompt: str, audio_locator_tag: str) -> list[str]:
    """Split a prompt at its audio locators: ``"a <A> b"`` -> ``["a", "b"]`` (one more piece than audios)."""
    return [piece.strip() for piece in prompt.split(audio_locator_tag)]


def cut_for_audio(audio_path: str, offset: float = 0.0, duration: float | None = None, cut_id: str | None = None) -> Cut:
    """A lhotse cut over a file, or over ``[offset, offset + duration)`` of it."""
    recording = Recording.from_file(audio_path, recording_id=cut_id or str(audio_path))
    cut = recording.to_cut()
    if offset or (duration is not None and duration < recording.duration):
        cut = cut.truncate(offset=offset, duration=min(duration or recording.duration, recording.duration - offset))
    if cut_id:
        cut.id = cut_id
    return cut


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
    cut_id = f"{Path(entry.path).stem}-{entry.line}"
    cut = cut_for_audio(entry["audio_filepath"], entry.get("offset", 0.0) or 0.0, entry["duration"], cut_id)
    turns = build_user_turns(prompt, [cut], audio_locator_tag, [entry.get("text", "")])
    turns.append(TextTurn(value=answer, role="assistant"))
    system = entry.get("system_prompt") or system_prompt
    if system:
        turns.insert(0, TextTurn(value=system, role="system"))
    return NeMoMultimodalConversation(id=cut_id, turns=turns, token_equivalent_duration=token_equivalent_duration)


class SpeechLMManifestAdapter:
    """Lazily iterates a manifest as conversations (picklable, so it runs in dataloader workers)."""

    def __init__(
        self,
        manifest_filepath: str,
        audio_locator_tag: str,
        token_equivalent_duration: float,
        prompt: str | None = None,
        answer_field: str = "text",
        system_prompt: str | None = None,
        skip_invalid: bool = False,
    ) -> None:
        self.manifest_filepath = manifest_filepath
        self.audio_locator_tag = audio_locator_tag
        self.token_equivalent_duration = token_equivalent_duration
        self.prompt = prompt
        self.answer_field = answer_field
        self.system_prompt = system_prompt
        self.skip_invalid = skip_invalid
        self.summary = SkipSummary()

    def __iter__(self) -> Iterator[NeMoMultimodalConversation]:
        for entry in read_manifest(
            self.manifest_filepath,
            required_text_fields=(),
            skip_invalid=self.skip_invalid,
            summary=self.summary,
        ):
            try:
                yield entry_to_conversation(
                    entry,
                    self.prompt,
                    self.audio_locator_tag,
                    self.token_equivalent_duration,
                    self.answer_field,
                    self.system_prompt,
                )
            except ManifestError as e:
                if not self.skip_invalid:
                    raise
                self.summary.add(e)


@data_type_parser(DATA_TYPE)
def read_speechlm_manifest(config) -> tuple[CutSet, bool]:
    """NeMo lhotse parser for ``type: speechlm_manifest`` (see module docstring for the keys)."""
    for key in ("manifest_filepath", "audio_locator_tag", "token_equivalent_duration"):
        if config.get(key) is None:
            raise ValueError(f"Data config of type {DATA_TYPE!r} needs `{key}` (got {dict(config)}).")
    cuts = CutSet(
        SpeechLMManifestAdapter(
            manifest_filepath=config.manifest_filepath,
            audio_locator_tag=config.audio_locator_tag,
            token_equivalent_duration=config.token_equivalent_duration,
            prompt=config.get("prompt"),
            answer_field=config.get("answer_field", "text"),
            system_prompt=config.get("system_prompt"),
            skip_invalid=config.get("skip_invalid", False),
        )
    )
    if not config.get("force_finite", False):
        cuts = cuts.repeat()
    return cuts, True
