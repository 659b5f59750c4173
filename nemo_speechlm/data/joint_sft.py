"""Joint speech-text SFT data (VoiceTextBlender): four line formats -> conversations, as NeMo lhotse data types.

=====================  ==========================================================================
``type:``              one JSONL line
=====================  ==========================================================================
``joint_text_sft``     ``{"conversations": [{"from": "User"|"Assistant", "value"}, ...], "system"?}``
``joint_asr_ast``      ``audio_filepath, duration, taskname (asr|ast|s2t_translation), source_lang,
                       target_lang (AST), pnc (yes|no), answer`` (or ``text``). The user turn is the
                       Canary-style instruction, then the audio: ``"{instruction}\\n<audio>"``
``joint_sqa``          ``audio_filepath, duration, question, answer``: ``"{question}\\n<audio>"``
``joint_mixed_modal``  the ``joint_text_sft`` schema with an audio placeholder inside user turns
                       (several turns may carry audio), plus ``audio_filepath`` (a path, or a list in
                       placeholder order) and ``duration`` (a number, or a list alike)
=====================  ==========================================================================

Roles map ``User`` -> user and ``Assistant`` -> assistant (case-insensitive); turns alternate,
starting with the user and ending with the assistant. The loss covers every assistant turn and
nothing else (the prompt formatter's mask). Every conversation carries ``custom["source"]``:
the ``tags: {source: ...}`` of its ``input_cfg`` entry (NeMo's ``attach_tags``), by default
the task (``text_sft``, ``asr``, ``ast``, ``sqa``, ``mixed_modal``), so the model can count
batches per source.

Data config keys (each type): ``manifest_filepath``, or for ``joint_asr_ast``/``joint_sqa`` also
a tarred manifest (+ ``tarred_audio_filepaths``) or ``shar_path`` (``nemo_speechlm.data.sources``); ``audio_placeholder`` (the string that
marks audio in the file's text, null = the model's ``audio_locator_tag``; mixed-modal and
text SFT only); ``system_prompt`` (used when a line has no ``system``); ``skip_invalid``
(count and skip bad lines instead of failing); ``tags`` and ``weight`` as for any NeMo
``input_cfg`` entry. ``audio_locator_tag``, ``token_equivalent_duration`` and ``speech_positions``
are filled in from the model.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from lhotse.cut import Cut
from nemo.collections.common.data.lhotse import NeMoMultimodalConversation
from nemo.collections.common.data.lhotse.cutset import data_type_parser
from nemo.collections.common.data.lhotse.text_adapters import TextTurn

from nemo_speechlm.data.conversations import (
    ManifestConversations,
    build_user_turns,
    cut_for_audio,
    entry_cut,
    finish_parsing,
    new_conversation,
    require_keys,
)
from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, validate_audio_fields
from nemo_speechlm.data import text_sft
from nemo_speechlm.data.sources import LineSource

TEXT_SFT, ASR_AST, SQA, MIXED_MODAL = "joint_text_sft", "joint_asr_ast", "joint_sqa", "joint_mixed_modal"
SOURCE_FIELD = "source"
ASR_TASKS = ("asr",)
AST_TASKS = ("ast", "s2t_translation")
# Canary language codes -> the names its instructions use (training and evaluation share this table).
LANGUAGES = {
    "en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "ru": "Russian", "pl": "Polish", "uk": "Ukrainian", "ja": "Japanese", "zh": "Chinese",
    "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "tr": "Turkish", "sv": "Swedish", "da": "Danish",
    "fi": "Finnish", "cs": "Czech", "el": "Greek", "hu": "Hungarian", "ro": "Romanian", "bg": "Bulgarian",
}
PNC_VALUES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


# ------------------------------------------------------------------ instructions


def canary_instruction(taskname: str, source_lang: str, target_lang: str | None = None, pnc: bool = True) -> str:
    """The Canary-style instruction VoiceTextBlender puts before the audio, e.g.
    ``"Translate the English content to German, ignoring punctuations and capitalizations."``"""
    style = "with punctuations and capitalizations" if pnc else "ignoring punctuations and capitalizations"
    if taskname in ASR_TASKS:
        return f"Transcribe the content to {LANGUAGES[source_lang]}, {style}."
    return f"Translate the {LANGUAGES[source_lang]} content to {LANGUAGES[target_lang]}, {style}."


def _asr_ast_instruction(entry: ManifestEntry) -> tuple[str, str]:
    """(instruction, source name) of a Canary-style line; errors name the field."""
    task = entry.get("taskname")
    if task not in ASR_TASKS + AST_TASKS:
        raise ManifestError(entry.path, entry.line, f"expected one of {ASR_TASKS + AST_TASKS}, got {task!r}", "taskname")
    source_lang = _language(entry, "source_lang")
    if task in AST_TASKS:
        target_lang = _language(entry, "target_lang")
    else:
        target_lang = entry.get("target_lang") or source_lang
        if target_lang != source_lang:
            raise ManifestError(
                entry.path, entry.line,
                f"an asr line transcribes, so target_lang must equal source_lang {source_lang!r} (got {target_lang!r}); "
                "use taskname ast for translation", "target_lang",
            )
    pnc = entry.get("pnc", "yes")
    key = str(pnc).strip().lower()
    if key not in PNC_VALUES:
        raise ManifestError(entry.path, entry.line, f"expected yes or no, got {pnc!r}", "pnc")
    source = "asr" if task in ASR_TASKS else "ast"
    return canary_instruction(task, source_lang, target_lang, PNC_VALUES[key]), source


def _language(entry: ManifestEntry, field_name: str) -> str:
    code = entry.get(field_name)
    if not code:
        raise ManifestError(entry.path, entry.line, f"missing language code (needed for taskname {entry.get('taskname')!r})", field_name)
    if code not in LANGUAGES:
        raise ManifestError(entry.path, entry.line, f"unknown language code {code!r}; known: {sorted(LANGUAGES)}", field_name)
    return code


# ------------------------------------------------------------------ conversations


def parse_turns(entry: ManifestEntry) -> list[tuple[str, str]]:
    """``(role, text)`` pairs of the line's ``conversations``, checked by the text SFT reader
    (known roles, alternating from the user to a final assistant turn, no empty turn)."""
    try:
        conversation = text_sft.to_conversation({"conversations": entry.get("conversations")})
    except text_sft.SFTFormatError as e:
        raise ManifestError(entry.path, entry.line, e.problem, e.field) from None
    if "system" in conversation:
        raise ManifestError(entry.path, entry.line, "a system turn belongs in the line's top-level `system` field",
                            "conversations[0].from")
    return [(turn["from"].lower(), turn["value"]) for turn in conversation["conversations"]]


def audio_cuts(entry: ManifestEntry) -> list[Cut]:
    """Cuts for a line's ``audio_filepath``/``duration`` (and ``offset``, for segments of longer files): one value
    each, or equal-length lists (the offset was ignored: a segment failed its duration check)."""
    paths, durations, offsets = entry.get("audio_filepath"), entry.get("duration"), entry.get("offset")
    if paths is None:
        return []
    if isinstance(paths, str):
        paths, durations, offsets = [paths], [durations], [offsets]
    offsets = [offsets] * len(paths) if not isinstance(offsets, list) else offsets  # one offset (or none) for all
    if not all(isinstance(v, list) and len(v) == len(paths) for v in (paths, durations, offsets)):
        raise ManifestError(
            entry.path, entry.line, "audio_filepath, duration and offset must be one value each or lists of equal "
            f"length, got {paths!r} / {durations!r} / {entry.get('offset')!r}", "duration"
        )
    cuts = []
    for i, (path, duration, offset) in enumerate(zip(paths, durations, offsets)):
        item = {"audio_filepath": path, "duration": duration, **({} if offset is None else {"offset": offset})}
        try:
            validate_audio_fields(entry.path, entry.line, item)
        except ManifestError as e:
            problem = str(e).split(f"field '{e.field}': ", 1)[-1]
            raise ManifestError(entry.path, entry.line, f"audio {i}: {problem}", e.field) from None
        cuts.append(cut_for_audio(item["audio_filepath"], item.get("offset") or 0.0, item["duration"],
                                  f"{Path(entry.path).stem}-{entry.line}-{i}"))
    return cuts


def turns_to_conversation(
    entry: ManifestEntry,
    turns: list[tuple[str, str]],
    cuts: list[Cut],
    audio_locator_tag: str,
    token_equivalent_duration: float,
    source: str,
    audio_placeholder: str | None = None,
    system_prompt: str | None = None,
    speech_positions: str = "frames",
) -> NeMoMultimodalConversation:
    """The conversation of checked ``(role, text)`` turns; each placeholder in user text takes the
    next cut, so text and speech stay in the order the line gives them."""
    placeholder = audio_placeholder or audio_locator_tag
    if placeholder != audio_locator_tag and any(audio_locator_tag in text for _, text in turns):
        # The placeholder becomes the locator below: a literal locator in the text would take a cut or vanish.
        raise ManifestError(entry.path, entry.line, f"the text contains the model's audio locator {audio_locator_tag!r} "
                            f"(the audio placeholder here is {placeholder!r})", "conversations")
    n_tags = sum(text.count(placeholder) for role, text in turns if role == "user")
    if any(placeholder in text for role, text in turns if role == "assistant"):
        raise ManifestError(entry.path, entry.line, f"the audio placeholder {placeholder!r} may only appear in user turns", "conversations")
    if n_tags != len(cuts):
        missing_audio = n_tags > len(cuts)
        what = "an audio placeholder without audio" if missing_audio else "audio without an audio placeholder"
        raise ManifestError(
            entry.path, entry.line,
            f"{what}: {n_tags} placeholder(s) {placeholder!r} in user turns but {len(cuts)} audio file(s)",
            "conversations" if missing_audio else "audio_filepath",
        )
    system = entry.get("system")
    own_system = isinstance(system, str) and bool(system.strip())
    system = system if own_system else system_prompt  # blank: the configured one
    if system and audio_locator_tag in system:  # it stopped training at the batch (a placeholder there stays text)
        raise ManifestError(entry.path, entry.line, f"the system prompt contains the audio locator {audio_locator_tag!r}"
                            + ("" if own_system else " (the data config's system_prompt)"), "system")
    out = [TextTurn(value=system, role="system")] if system else []
    remaining = list(cuts)
    for role, text in turns:
        if role == "assistant":
            out.append(TextTurn(value=text, role="assistant"))
            continue
        n = text.count(placeholder)
        mine, remaining = remaining[:n], remaining[n:]
        user = build_user_turns(text.replace(placeholder, audio_locator_tag), mine, audio_locator_tag, [None] * n)
        out.extend(user or [TextTurn(value="", role="user")])
    return new_conversation(f"{Path(entry.path).stem}-{entry.line}", out, token_equivalent_duration, speech_positions,
                            custom={SOURCE_FIELD: source})


def text_sft_conversation(entry: ManifestEntry, **kwargs) -> NeMoMultimodalConversation:
    """A ``joint_text_sft`` line: text only, so a placeholder or audio field is an error."""
    if entry.get("audio_filepath") is not None:
        raise ManifestError(entry.path, entry.line, f"text SFT lines have no audio; use type {MIXED_MODAL} for speech turns", "audio_filepath")
    return turns_to_conversation(entry, parse_turns(entry), [], source="text_sft", **kwargs)


def mixed_modal_conversation(entry: ManifestEntry, **kwargs) -> NeMoMultimodalConversation:
    """A ``joint_mixed_modal`` line: text and speech spliced in the order of the user text."""
    turns = parse_turns(entry)
    if entry.get("audio_filepath") is None:
        raise ManifestError(entry.path, entry.line, f"a mixed-modal line needs audio; use type {TEXT_SFT} for text only", "audio_filepath")
    return turns_to_conversation(entry, turns, audio_cuts(entry), source="mixed_modal", **kwargs)


def asr_ast_conversation(entry: ManifestEntry, audio_locator_tag: str, **kwargs) -> NeMoMultimodalConversation:
    """A ``joint_asr_ast`` line: ``"{instruction}\\n<audio>"`` -> ``answer`` (or ``text``)."""
    instruction, source = _asr_ast_instruction(entry)
    return _single_audio_conversation(entry, instruction, _answer(entry), source, audio_locator_tag, **kwargs)


def sqa_conversation(entry: ManifestEntry, audio_locator_tag: str, **kwargs) -> NeMoMultimodalConversation:
    """A ``joint_sqa`` line: ``"{question}\\n<audio>"`` -> ``answer``."""
    return _single_audio_conversation(entry, entry["question"], entry["answer"], "sqa", audio_locator_tag, **kwargs)


def _single_audio_conversation(entry, text, answer, source, audio_locator_tag, **kwargs) -> NeMoMultimodalConversation:
    if audio_locator_tag in text:
        raise ManifestError(entry.path, entry.line, f"the text contains the audio locator {audio_locator_tag!r}; the audio goes after it", "question")
    cut = entry_cut(entry, f"{Path(entry.path).stem}-{entry.line}")
    turns = [("user", f"{text}\n{audio_locator_tag}"), ("assistant", answer)]
    return turns_to_conversation(entry, turns, [cut], audio_locator_tag, source=source, **kwargs)


def _answer(entry: ManifestEntry) -> str:
    """``answer``, or ``text`` on a line without one (a NeMo ASR line). An ``answer`` that is there but empty is an
    error: falling back to ``text`` trained an AST line to answer with its source-language transcript."""
    name = "text" if "answer" not in entry.data and "text" in entry.data else "answer"
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(entry.path, entry.line, f"missing or empty answer (got {name}={value!r})", name)
    return value


# ------------------------------------------------------------------ NeMo lhotse parsers

# type -> (line -> conversation, text fields every line must have, whether each line has exactly one audio file)
_FORMATS = {
    TEXT_SFT: (text_sft_conversation, (), False),
    MIXED_MODAL: (mixed_modal_conversation, (), False),
    ASR_AST: (asr_ast_conversation, (), True),
    SQA: (sqa_conversation, ("question", "answer"), True),
}


def _build(entry: ManifestEntry, iteration: int, to_conversation, **kwargs) -> NeMoMultimodalConversation:
    return to_conversation(entry, **kwargs)


def _read(config, data_type: str) -> tuple:
    require_keys(config, data_type, ("audio_locator_tag", "token_equivalent_duration"))
    to_conversation, required, has_audio = _FORMATS[data_type]
    kwargs = {
        "audio_locator_tag": config.audio_locator_tag,
        "token_equivalent_duration": config.token_equivalent_duration,
        "system_prompt": config.get("system_prompt"),
        "speech_positions": config.get("speech_positions", "frames"),
    }
    if not has_audio:
        kwargs["audio_placeholder"] = config.get("audio_placeholder")
    adapter = ManifestConversations(
        LineSource.from_config(config, data_type, has_audio=has_audio),
        partial(_build, to_conversation=to_conversation, **kwargs),
        required_text_fields=required,
        skip_invalid=config.get("skip_invalid", False),
        has_audio=has_audio,
    )
    return finish_parsing(config, adapter)


@data_type_parser(TEXT_SFT)
def read_joint_text_sft(config) -> tuple:
    """``type: joint_text_sft`` (keys in the module docstring)."""
    return _read(config, TEXT_SFT)


@data_type_parser(ASR_AST)
def read_joint_asr_ast(config) -> tuple:
    """``type: joint_asr_ast`` (keys in the module docstring)."""
    return _read(config, ASR_AST)


@data_type_parser(SQA)
def read_joint_sqa(config) -> tuple:
    """``type: joint_sqa`` (keys in the module docstring)."""
    return _read(config, SQA)


@data_type_parser(MIXED_MODAL)
def read_joint_mixed_modal(config) -> tuple:
    """``type: joint_mixed_modal`` (keys in the module docstring)."""
    return _read(config, MIXED_MODAL)
