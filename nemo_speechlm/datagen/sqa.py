"""Speech QA generation (VoiceTextBlender): an LLM turns each ASR transcript into a question and its answer.

The LLM reads the transcript of an utterance and writes one question that the utterance
answers, plus that answer, as one JSON object (``{"question": ..., "answer": ...}``), or
``none`` when the text is meaningless. One worked example is given as an earlier chat turn
(few-shot), which small instruct models follow far better than an instruction alone.
The training line points at the same audio: the speech model hears the utterance, reads the
question, and learns to answer it.

Rejections (counted by the shared runner, stored in ``<output>.rejected.jsonl``):
``unparsable`` (no JSON object with the two fields), ``none`` (the LLM said the text is
meaningless, or its question is "none"), ``empty_field`` (a field is missing, blank or without a
letter or digit, e.g. the instruction's own "..."), ``copied_example`` (the LLM repeated the worked
example's question, punctuation and case aside, instead of reading the transcript).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from nemo_speechlm.data.manifest import SkipSummary, data_for_output, read_manifest
from nemo_speechlm.data.utterance import utterance_id
from nemo_speechlm.datagen.chat_generator import ChatGenerator
from nemo_speechlm.parts.runner import Job, Outcome, Rejected

REASONS = ("unparsable", "none", "empty_field", "copied_example")

INSTRUCTION = (
    "Read the text and write one question that the text answers, and its answer, using only facts stated "
    "in the text. "
    'Reply with a single JSON object: {{"question": "...", "answer": "..."}}. '
    "If the text is meaningless, reply with: none\n\nText: {text}"
)
EXAMPLE_TEXT = "The museum opens at nine in the morning and closes at five in the evening."
EXAMPLE_QA = {"question": "When does the museum open?", "answer": "It opens at nine in the morning."}

# Fields of the input line that the SQA line does not copy: the transcript moves to
# ``original_text``; the rest are written by this job.
_REPLACED = ("text", "question", "answer", "original_text", "teacher")

_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)\s*```", re.DOTALL)


def sqa_key(record: dict) -> str:
    """Stable key of an utterance and of its SQA line: audio path and offset (shared by both)."""
    return utterance_id(record)


def sqa_items(
    manifest: str | Path, skip_invalid: bool = False, summary: SkipSummary | None = None,
    output_path: str | Path | None = None,
) -> Iterator[dict]:
    """The validated manifest lines (``audio_filepath``, ``duration``, ``text``, ...), one item each, as the
    SQA file at ``output_path`` holds them (a relative audio path relative to its directory: ``data_for_output``)."""
    for entry in read_manifest(manifest, skip_invalid=skip_invalid, summary=summary):
        yield data_for_output(entry, output_path)


def sqa_messages(text: str, system_prompt: str | None = None) -> list[dict]:
    """The chat for one transcript: instruction + worked example, then the same instruction on ``text``."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [
        {"role": "user", "content": INSTRUCTION.format(text=EXAMPLE_TEXT)},
        {"role": "assistant", "content": json.dumps(EXAMPLE_QA)},
        {"role": "user", "content": INSTRUCTION.format(text=text)},
    ]


def parse_sqa(output: str) -> dict | Rejected:
    """``{"question", "answer"}`` from an LLM output, or the :class:`Rejected` reason why not.

    Takes the first JSON object in the output (inside a ```json fence or not, with text around
    it); an output whose first word is ``none`` and that holds no object means "meaningless".
    Numbers as values are read as text; other non-strings count as unparsable.
    """
    text = output.strip()
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1), text] if fenced else [text]
    for candidate in candidates:
        obj = _first_json_object(candidate)
        if obj is not None:
            return _qa_fields(obj, output)
    first_word = re.sub(r"[^a-z]", "", (text.split() or [""])[0].lower())
    if first_word == "none" or (fenced and fenced.group(1).strip().strip("\"'`.").lower() == "none"):
        return Rejected("none", output[:200])
    return Rejected("unparsable", output[:200])


def _first_json_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _qa_fields(obj: dict, output: str) -> dict | Rejected:
    """The pair, or why not. A field without a letter or digit counts as empty: a teacher echoing the instruction's
    own ``{"question": "...", "answer": "..."}`` wrote a training line asking "..."; a question saying none is the
    reply for meaningless text, and a question that is the worked example's (punctuation and case aside)."""
    fields = {}
    for name in ("question", "answer"):
        value = obj.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if value is not None and not isinstance(value, str):
            return Rejected("unparsable", output[:200])
        if value is None or not _words(value):
            return Rejected("empty_field", output[:200])
        if name == "question" and _words(value) == "none":  # ("none" is a fine answer to "How many are left?")
            return Rejected("none", output[:200])
        fields[name] = " ".join(value.split())
    if _words(fields["question"]) == _words(EXAMPLE_QA["question"]):
        return Rejected("copied_example", output[:200])
    return fields


def _words(text: str) -> str:
    """Lower-case words and numbers only: what two texts must share to count as the same."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def sqa_job(
    generator: ChatGenerator, max_new_tokens: int, system_prompt: str | None = None
) -> Job:
    """``process_batch`` for the runner: ask the LLM for each item's QA pair, parse it, write SQA lines
    (the teacher's settings are checked when an output is resumed)."""
    teacher = {**generator.generation_settings(), "max_new_tokens": max_new_tokens, "system_prompt": system_prompt}

    def process(items: list[dict]) -> list[Outcome]:
        conversations = [sqa_messages(item["text"], system_prompt) for item in items]
        results = generator.generate(conversations, max_new_tokens=max_new_tokens)
        return [_outcome(item, result.text, teacher) for item, result in zip(items, results)]

    return Job(process, teacher, ("question", "answer"),
               lambda item: {"original_text": item["text"]})  # a corrected transcript is asked about anew


def _outcome(item: dict, output: str, teacher: dict) -> Outcome:
    qa = parse_sqa(output)
    if isinstance(qa, Rejected):
        return qa
    return sqa_record(item, qa["question"], qa["answer"], teacher)


def sqa_record(item: dict, question: str, answer: str, teacher: dict) -> dict:
    """The SQA manifest line: the input's audio fields (and any extras), the QA pair, the transcript."""
    extras = {k: v for k, v in item.items() if k not in _REPLACED}
    return {**extras, "question": question, "answer": answer, "original_text": item["text"], "teacher": teacher}
