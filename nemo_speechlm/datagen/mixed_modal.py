"""Mixed-modal conversations (VoiceTextBlender): part of a text instruction is replaced by its speech.

For each text SFT conversation, the first user turn is split into sentences; a random
contiguous run of sentences (any run, uniformly, so a one-sentence instruction is always
fully spoken) is normalized for TTS (:func:`normalize_for_tts`), spoken by a random speaker,
and replaced by the audio locator tag; the text before and after stays as it was
(whitespace included). The choices are seeded by ``seed`` and the conversation id, so a
rerun makes the same choices. The wav is written (atomically) before its manifest line, so
a line in the output always points at a complete file.

Output line::

    {"id", ["system",] "conversations": [{"from": "User", "value": "text before <|audio|> text after"},
                                          {"from": "Assistant", "value": ...}, ...],
     "audio_filepath", "duration", "spoken_text", "speaker"}

``spoken_text`` is the normalized text the audio says. Conversations that cannot be used
are rejected (counted by the shared runner): the :class:`SFTFormatError` reasons
(``no_user_turn``, ``empty_text``, ``unknown_role``, ...), ``locator_in_text`` (the user text
already contains the locator tag), ``too_long`` (no run of sentences fits
``max_spoken_words``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile

from nemo_speechlm.data.manifest import ManifestError, SkipSummary
from nemo_speechlm.data.task_checks import split_sentences
from nemo_speechlm.data.text_sft import SFTFormatError, read_records, to_conversation
from nemo_speechlm.parts.runner import Job, Outcome, Rejected
from nemo_speechlm.tts.base import SpeechSynthesizer, Synthesis
from nemo_speechlm.tts.normalize import normalize_for_tts

DEFAULT_LOCATOR = "<|audio|>"
SAMPLE_RATE = 16000


def mixed_modal_items(
    path: str | Path, skip_invalid: bool = False, summary: SkipSummary | None = None
) -> Iterator[dict]:
    """Items ``{"id", "record", "source"}`` for every record of a text SFT file (JSONL or JSON array).

    The id is the record's ``id``, or else a hash of its content (``-2``, ``-3``, ... for repeats),
    so it survives edits elsewhere in the file. Records are converted and checked in the job,
    where unusable ones become counted rejections; a repeated ``id`` is an error here.
    """
    first_line: dict[str, int] = {}
    repeats: dict[str, int] = {}
    for line, record in read_records(path, skip_invalid, summary):
        given = record.get("id") if isinstance(record, dict) else None
        if given is None:
            digest = hashlib.sha1(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
            repeats[digest] = repeats.get(digest, 0) + 1
            conv_id = digest if repeats[digest] == 1 else f"{digest}-{repeats[digest]}"
        else:
            conv_id = str(given)
        if conv_id in first_line:
            err = ManifestError(path, line, f"duplicate id {conv_id!r} (first on line {first_line[conv_id]})", "id")
            if not skip_invalid:
                raise err
            if summary is not None:
                summary.add(err)
            continue
        first_line[conv_id] = line
        yield {"id": conv_id, "record": record, "source": f"{path}:{line}"}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character ``(start, end)`` of each sentence of ``text``, in order (see ``split_sentences``)."""
    spans, pos = [], 0
    for sentence in split_sentences(text):
        start = text.index(sentence, pos)
        spans.append((start, start + len(sentence)))
        pos = start + len(sentence)
    return spans


def choose_spoken_span(text: str, rng: random.Random, max_spoken_words: int | None = None) -> tuple[int, int] | str:
    """Character span of a random contiguous run of sentences to speak, or the rejection reason.

    Every run with something speakable (and at most ``max_spoken_words`` words once normalized)
    is equally likely.
    """
    spans = sentence_spans(text)
    spoken = [normalize_for_tts(text[start:end]) for start, end in spans]
    speakable = [any(c.isalnum() for c in s) for s in spoken]
    n_words = [len(s.split()) for s in spoken]
    speech_from = [False] * (len(spans) + 1)  # speech_from[k]: a sentence from the k-th on has something to speak
    for k in reversed(range(len(spans))):
        speech_from[k] = speakable[k] or speech_from[k + 1]
    runs, too_long = [], False
    for i in range(len(spans)):  # (running totals: slicing per run took minutes on a pasted 10,000-line text)
        words, has_speech = 0, False
        for j in range(i + 1, len(spans) + 1):
            words, has_speech = words + n_words[j - 1], has_speech or speakable[j - 1]
            if max_spoken_words is not None and words > max_spoken_words:
                too_long = too_long or has_speech or speech_from[j]
                break  # longer runs from i only add words
            if has_speech:
                runs.append((spans[i][0], spans[j - 1][1]))
    if not runs:
        return "too_long" if too_long else "empty_text"
    return rng.choice(runs)


def mixed_modal_job(
    speakers: Sequence[SpeechSynthesizer],
    audio_dir: str | Path,
    seed: int = 0,
    audio_locator_tag: str = DEFAULT_LOCATOR,
    max_spoken_words: int | None = 100,
    sample_rate: int = SAMPLE_RATE,
    settings: dict | None = None,
) -> Job:
    """The runner's job: speak part of each first user turn, write the wav and the line. ``settings`` (the voices)
    are what a resumed output must have been made with, besides this function's own choices."""
    if not speakers:
        raise ValueError("mixed_modal_job needs at least one speaker")
    audio_dir = Path(audio_dir).resolve()
    audio_dir.mkdir(parents=True, exist_ok=True)

    def plan(item: dict) -> _Plan | Rejected:
        return plan_example(item, len(speakers), seed, audio_locator_tag, max_spoken_words)

    def process(items: list[dict]) -> list[Outcome]:
        return [_example(item, plan(item), speakers, audio_dir, sample_rate) for item in items]

    def copied_inputs(item: dict) -> dict:
        """What the line keeps of its conversation (the spoken text, the text around the locator, later turns, the
        system prompt): a conversation edited under the same id is spoken anew, one that became usable is retried.
        (``spoken_text`` is the TTS's normalization of the planned text, the same as TTS normalization is idempotent.)"""
        planned = plan(item)
        if isinstance(planned, Rejected):
            return {"conversations": None}
        return {"spoken_text": planned.spoken, "conversations": planned.conversations, "system": planned.system}

    own = {"seed": seed, "audio_locator_tag": audio_locator_tag, "max_spoken_words": max_spoken_words}
    return Job(process, {**(settings or {}), **own}, ("audio_filepath", "spoken_text"), copied_inputs)


@dataclass(frozen=True)
class _Plan:
    """What one conversation becomes before any audio is made: the speaker, the spoken text and the turns."""

    speaker: int  # index into the speakers
    spoken: str  # the normalized text to speak
    conversations: list[dict]  # the first user turn with the locator in place of the spoken run, then the rest
    system: str | None


def plan_example(
    item: dict, n_speakers: int, seed: int, audio_locator_tag: str, max_spoken_words: int | None
) -> _Plan | Rejected:
    """The speaker and run of sentences for one conversation (seeded by ``seed`` and its id), or why it is rejected."""
    try:
        conversation = to_conversation(item["record"])
    except SFTFormatError as e:
        return Rejected(e.reason, f"{item['source']}: {e.problem}" + (f" ({e.field})" if e.field else ""))
    turns = conversation["conversations"]
    text = turns[0]["value"]
    # anywhere in the conversation, not only the turn spoken: training refuses a line with more locators than audio
    where = [f"turn {i}" for i, turn in enumerate(turns) if audio_locator_tag in turn["value"]]
    where += ["the system prompt"] if audio_locator_tag in (conversation.get("system") or "") else []
    if where:
        return Rejected("locator_in_text", f"{item['source']}: {', '.join(where)} already contain(s) {audio_locator_tag!r}")
    rng = random.Random(f"{seed}|{item['id']}")
    speaker = rng.randrange(n_speakers)
    span = choose_spoken_span(text, rng, max_spoken_words)
    if isinstance(span, str):
        return Rejected(span, f"{item['source']}: {text[:150]}")
    start, end = span
    user = {"from": "User", "value": text[:start] + audio_locator_tag + text[end:]}
    return _Plan(speaker, normalize_for_tts(text[start:end]), [user, *turns[1:]], conversation.get("system"))


def _example(
    item: dict, planned: _Plan | Rejected, speakers: Sequence[SpeechSynthesizer], audio_dir: Path, sample_rate: int
) -> Outcome:
    """One conversation -> its mixed-modal line (after writing its wav), or a :class:`Rejected`."""
    if isinstance(planned, Rejected):
        return planned
    tts = speakers[planned.speaker]
    syn = _synthesize(tts, planned.spoken, sample_rate)
    wav = audio_dir / _wav_name(item["id"], f"{tts.speaker}|{sample_rate}|{syn.text}")
    _write_wav_atomic(wav, syn.audio, sample_rate)
    record = {"id": item["id"]}
    if planned.system is not None:
        record["system"] = planned.system
    record.update({
        "conversations": planned.conversations,
        "audio_filepath": str(wav),
        "duration": round(len(syn.audio) / sample_rate, 4),
        "spoken_text": syn.text,
        "speaker": tts.speaker,
    })
    return record


def _synthesize(tts: SpeechSynthesizer, text: str, sample_rate: int) -> Synthesis:
    syn = tts.synthesize(text)
    if syn.sample_rate != sample_rate:
        import soxr

        syn.audio = soxr.resample(syn.audio, syn.sample_rate, sample_rate).astype(np.float32)
        syn.sample_rate = sample_rate
    syn.text = syn.text or text
    return syn


def _wav_name(conv_id: str, spoken: str) -> str:
    """The id as a file name, with a digest of the id and of what is spoken by whom: two datasets sharing an
    ``--audio-dir`` and an id (``a1``) no longer overwrite each other's speech (named by id alone, the second run
    replaced the first's wav under its finished lines); the same line spoken again gets the same file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", conv_id)[:80].strip(".") or "conv"
    return f"{safe}-{hashlib.sha1(f'{conv_id}|{spoken}'.encode()).hexdigest()[:10]}.wav"


def _write_wav_atomic(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    soundfile.write(str(tmp), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
