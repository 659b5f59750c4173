"""Text SFT data in our conversation format, converted from the common public formats.

Our format (one JSON object per line; the text-only part of the joint SFT blend, and the
input of mixed-modal generation)::

    {"id": "optional", "system": "optional system prompt",
     "conversations": [{"from": "User", "value": "..."}, {"from": "Assistant", "value": "..."}, ...]}

Accepted inputs, detected per record:

* ShareGPT-style ``conversations: [{"from": "human"|"gpt"|"system", "value"}]`` (also our own
  format, ``User``/``Assistant``);
* OpenAI-style ``messages: [{"role": "user"|"assistant"|"system", "content"}]`` (``content``
  may also be a list of ``{"type": "text", "text"}`` parts);
* Alpaca-style ``instruction`` [+ ``input``] + ``output`` (instruction and input joined by a
  blank line), with LLaMA-Factory's ``history`` (``[[user, assistant], ...]``, the turns before).

OpenAI's per-message ``weight: 0`` (do not train on this answer) is refused: every assistant turn trains here.
``developer`` (OpenAI's newer name) is a system turn. A UTF-8 byte-order mark at the start of a file is dropped.

A usable conversation starts with a user turn, alternates user/assistant, ends with an
assistant turn (the training target), and has no empty turn; a system prompt may come
first or as a top-level ``system`` field. Anything else is an error naming the file, the
line and the field, because silently dropping turns changes what the model learns.
"""
from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from nemo_speechlm.data.manifest import ManifestError, SkipSummary, decode_line
from nemo_speechlm.errors import InputError

USER, ASSISTANT = "User", "Assistant"

# Role names of the public formats (lower-cased) -> ours; "system" is handled apart.
ROLES = {
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "chatgpt": ASSISTANT,
    "model": ASSISTANT,
}
SYSTEM = "system"


class _Turn(NamedTuple):
    role: str  # User, Assistant or system
    text: str
    role_field: str  # where the role and the text are, for error messages
    text_field: str


class SFTFormatError(ValueError):
    """A record is not a usable conversation. ``reason`` is a short key for counting
    (``unknown_format``, ``unknown_role``, ``empty_text``, ``no_user_turn``, ``not_alternating``,
    ``no_assistant_turn``, ``bad_system``); ``field`` names where the problem is."""

    def __init__(self, problem: str, field: str | None = None, reason: str = "invalid_conversation"):
        super().__init__(problem)
        self.problem, self.field, self.reason = problem, field, reason


def to_conversation(record: dict, require_answer: bool = True) -> dict:
    """Our format from one record of any accepted format (see module doc); raises :class:`SFTFormatError`.

    ``require_answer=False`` also accepts a conversation that ends with a user turn (a prompt to answer).
    """
    if not isinstance(record, dict):
        raise SFTFormatError(f"expected a JSON object, got {type(record).__name__}", reason="unknown_format")
    if "conversations" in record:
        turns = _turns(record, "conversations", role_key="from", text_key="value")
    elif "messages" in record:
        turns = _turns(record, "messages", role_key="role", text_key="content")
    elif "instruction" in record and "output" in record:
        turns = _alpaca_turns(record)
    else:
        raise SFTFormatError(
            f"unrecognized SFT record with fields {sorted(record)}; expected `conversations` (ShareGPT / ours), "
            "`messages` (OpenAI) or `instruction` + `output` (Alpaca)",
            reason="unknown_format",
        )
    system, turns = _take_system(record, turns)
    _check_turns(turns, require_answer)
    out: dict = {}
    if record.get("id") is not None:
        out["id"] = record["id"]
    if system:
        out["system"] = system
    out["conversations"] = [{"from": turn.role, "value": turn.text} for turn in turns]
    return out


def _turns(record: dict, list_key: str, role_key: str, text_key: str) -> list[_Turn]:
    """``(role, text, field)`` per turn, roles mapped to ours (or ``system``)."""
    turns = record[list_key]
    if not isinstance(turns, list) or not turns:
        raise SFTFormatError(f"must be a non-empty list of turns, got {turns!r:.80}", list_key, "no_user_turn")
    out = []
    for i, turn in enumerate(turns):
        where = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise SFTFormatError(f"a turn must be an object with `{role_key}` and `{text_key}`, got {turn!r:.80}", where)
        role = turn.get(role_key)
        name = role.strip().lower() if isinstance(role, str) else None
        name = SYSTEM if name == "developer" else name
        if turn.get("weight", 1) == 0:
            raise SFTFormatError("`weight: 0` (do not train on this turn) is not supported: every assistant turn "
                                 "trains here; drop the turn's conversation or the weight", f"{where}.weight",
                                 "unsupported_weight")
        if name != SYSTEM and name not in ROLES:
            known = sorted({*ROLES, USER, ASSISTANT, SYSTEM})
            raise SFTFormatError(f"unknown role {role!r}; expected one of {known}", f"{where}.{role_key}", "unknown_role")
        text = _text(turn.get(text_key), f"{where}.{text_key}")
        out.append(_Turn(SYSTEM if name == SYSTEM else ROLES[name], text, f"{where}.{role_key}", f"{where}.{text_key}"))
    return out


def _text(value, where: str) -> str:
    """A turn's text: a string, or OpenAI-style text parts joined."""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise SFTFormatError(f"only text content parts are supported, got {part!r:.80}", f"{where}[{j}]")
            parts.append(part["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        raise SFTFormatError(f"must be a string, got {type(value).__name__}", where, "empty_text")
    return value


def _alpaca_turns(record: dict) -> list[_Turn]:
    """The ``history`` pairs, then the instruction (and input) and the output; the history was dropped, training the
    last answer without the turns it answers."""
    instruction = _text(record["instruction"], "instruction")
    extra = _text(record.get("input") or "", "input")
    user = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() and instruction.strip() else instruction
    user = user if user.strip() else extra  # an empty instruction with an input: the input is the request
    output = _text(record["output"], "output")
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in history):
        raise SFTFormatError(f"expected a list of [user, assistant] pairs, got {history!r:.80}", "history")
    turns = []
    for i, (asked, answered) in enumerate(history):
        turns += [_Turn(USER, _text(asked, f"history[{i}][0]"), f"history[{i}]", f"history[{i}][0]"),
                  _Turn(ASSISTANT, _text(answered, f"history[{i}][1]"), f"history[{i}]", f"history[{i}][1]")]
    return turns + [_Turn(USER, user, "instruction", "instruction"), _Turn(ASSISTANT, output, "output", "output")]


def _take_system(record: dict, turns: list[_Turn]) -> tuple[str | None, list[_Turn]]:
    """The system prompt (a first ``system`` turn or a top-level ``system`` field) and the other turns."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise SFTFormatError(f"must be a string, got {type(system).__name__}", "system", "bad_system")
    if turns and turns[0].role == SYSTEM:
        if system and system.strip():
            raise SFTFormatError("two system prompts: a top-level `system` field and a first system turn",
                                 turns[0].role_field, "bad_system")
        system, turns = turns[0].text, turns[1:]
    for turn in turns:
        if turn.role == SYSTEM:
            raise SFTFormatError("a system turn is only allowed as the first turn", turn.role_field, "bad_system")
    return (system.strip() or None) if system else None, turns


def _check_turns(turns: list[_Turn], require_answer: bool = True) -> None:
    if not turns or turns[0].role != USER:
        where = turns[0].role_field if turns else None
        got = f", got {turns[0].role}" if turns else ""
        raise SFTFormatError(f"the conversation must start with a user turn{got}", where, "no_user_turn")
    for i, turn in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise SFTFormatError(f"turns must alternate User/Assistant: this turn is {turn.role}, expected {expected}",
                                 turn.role_field, "not_alternating")
        if not turn.text.strip():
            raise SFTFormatError(f"empty {turn.role} turn", turn.text_field, "empty_text")
    if require_answer and turns[-1].role != ASSISTANT:
        raise SFTFormatError("the conversation must end with an assistant turn (the training target)",
                             turns[-1].role_field, "no_assistant_turn")


def read_records(
    path: str | Path, skip_invalid: bool = False, summary: SkipSummary | None = None
) -> Iterator[tuple[int, dict]]:
    """``(line, record)`` of a JSONL file, or of a JSON array file (then ``line`` is the record's 1-based position).

    Lines that are not JSON objects raise :class:`ManifestError` (or are skipped and counted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT file not found: {path}")
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        try:
            lines = path.read_bytes().splitlines(keepends=True)
            records = json.loads("".join(decode_line(path, i, raw) for i, raw in enumerate(lines, start=1)))
        except json.JSONDecodeError as e:
            raise ManifestError(path, e.lineno, f"not a valid JSON array ({e.msg} at column {e.colno})") from None
        yield from enumerate(records, start=1)
        return
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(decode_line(path, line_no, raw))
            except (json.JSONDecodeError, ManifestError) as e:
                err = e if isinstance(e, ManifestError) else ManifestError(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})")
                if not skip_invalid:
                    raise err from None
                if summary is not None:
                    summary.add(err)


def read_text_sft(
    path: str | Path, skip_invalid: bool = False, summary: SkipSummary | None = None, require_answer: bool = True
) -> Iterator[tuple[int, dict]]:
    """``(line, conversation)`` of ``path`` in our format; bad records raise :class:`ManifestError`
    naming file, line and field, or with ``skip_invalid`` are skipped and counted in ``summary``."""
    for line_no, record in read_records(path, skip_invalid, summary):
        try:
            yield line_no, to_conversation(record, require_answer)
        except SFTFormatError as e:
            err = ManifestError(path, line_no, e.problem, e.field)
            if not skip_invalid:
                raise err from None
            if summary is not None:
                summary.add(err)


def prepare_text_sft(
    inputs: Iterable[str | Path], output: str | Path, skip_invalid: bool = False, summary: SkipSummary | None = None
) -> int:
    """Convert every record of ``inputs`` (any accepted format, mixed freely) into ``output`` (our JSONL).

    The output is written to a temporary file and renamed, so a failed conversion leaves no
    partial file. Returns the number of conversations written.
    """
    output = Path(output)
    if output.is_dir():  # found at the final rename, named as the temporary file
        raise InputError(f"{output}: is a directory", "give a file path for the output, e.g. " + str(output / "sft.jsonl"))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for path in inputs:
                for _, conversation in read_text_sft(path, skip_invalid, summary):
                    out.write(json.dumps(conversation, ensure_ascii=False) + "\n")
                    count += 1
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return count

