"""Answering items about their audio with a loaded speech LLM: shared by ``speechlm-infer`` and
the evaluations (one batched, resumable loop, one item key, one set of decoding settings)."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from nemo_speechlm.data.audio import load_entry_audio
from nemo_speechlm.data.manifest import ManifestEntry
from nemo_speechlm.data.utterance import utterance_id
from nemo_speechlm.models.speechlm_model import SpeechLMModel
from nemo_speechlm.parts.runner import Job, RunSummary, run_resumable

SYSTEM_PROMPT_HELP = ("system prompt of every request (default: the one the model trained under, recorded in its "
                      ".nemo by training, if any; '' for none)")


def generation_kwargs(
    max_new_tokens: int | None = None, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0
) -> dict:
    """Hugging Face ``generate`` settings: greedy by default; ``None`` keeps the model's length cap."""
    kwargs: dict = {"do_sample": bool(sample)}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    return kwargs


def ensure_audio_locator(prompt: str, tag: str) -> tuple[str, bool]:
    """The prompt with the audio locator appended on a new line when it has none; also says
    whether it was appended (so the caller can tell the user once)."""
    if tag in prompt:
        return prompt, False
    return f"{prompt}\n{tag}", True


def item_keys(entries: Sequence[ManifestEntry], prompts: Sequence[str]) -> list[str]:
    """A stable, unique key per (line, prompt) for resuming.

    A line's own ``key`` field is used when it has one (e.g. a behaviors file); otherwise the
    key is the audio and offset plus a digest of the prompt, so a changed prompt is a new
    item, and repeated identical lines get ``#2``, ``#3``...
    """
    keys, seen = [], Counter()
    for entry, prompt in zip(entries, prompts):
        if isinstance(entry.get("key"), (str, int)) and not isinstance(entry.get("key"), bool):
            keys.append(entry["key"])
            continue
        key = f"{utterance_id(entry)}|{hashlib.sha1(prompt.encode()).hexdigest()[:10]}"
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def answer_items(
    model: SpeechLMModel,
    items: list[dict],
    output_path: str | Path,
    make_record: Callable[[dict, str], dict],
    batch_size: int = 8,
    system_prompt: str | None = None,
    desc: str = "Answering",
    exclusive: bool = True,
    **generation: object,
) -> RunSummary:
    """Answer ``{"key", "entry", "prompt"}`` items about their audio through the resumable runner.

    ``make_record(item, answer)`` builds the output line (it must carry ``item["key"]``, and the item's ``prompt``
    and its line's ``offset`` and ``duration`` where the line has them), so inference and every evaluation share one
    batched, resumable loop. A cached answer whose prompt or segment differs from its item's now is made anew: a
    line's own ``key`` field (or its audio and offset) names the item, and an edited question or a corrected
    segment kept the answer to the old one. ``exclusive``: see
    :func:`~nemo_speechlm.parts.runner.run_resumable` (False where the output is read by key).
    """

    def process(batch: list[dict]) -> list[dict]:
        audios = [load_entry_audio(item["entry"], model.sampling_rate, model.encoder_frame_duration) for item in batch]
        answers = model.respond(audios, [item["prompt"] for item in batch], batch_size=len(batch),
                                system_prompt=system_prompt, **generation)
        return [make_record(item, a) for item, a in zip(batch, answers)]

    job = Job(process, settings=None, copied_inputs=_asked)
    return run_resumable(items, job, output_path, batch_size=batch_size, desc=desc, key="key", exclusive=exclusive)


def _asked(item: dict) -> dict:
    """What an answer was made for, as its record copies it: the prompt and the audio segment (``None`` where the line
    has no offset or duration, as the record then has none: a segment bound removed from a keyed line kept the answer
    to the segment)."""
    entry = item["entry"]
    return {"prompt": item["prompt"], "offset": entry.get("offset"), "duration": entry.get("duration")}
