"""Rejecting degenerate LLM answers before they become training targets.

A behavior or SQA answer is only worth imitating if it is a real answer. The rules are
deliberately few and simple, checked in this order (the first that applies is the reason):

``empty``
    The answer has no letter or digit.
``repeats_prompt``
    The answer is (nearly) the prompt: its word sequence matches the instruction text (the
    prompt with the transcript removed) or the whole prompt with a ``difflib`` ratio of at
    least 0.85, and matches it better than it matches the transcript (repeating the transcript
    is the right answer to "repeat"-style tasks).
``refusal``
    The answer *starts with* a refusal phrase (``I'm sorry, but``, ``As an AI,``, ``I cannot help``,
    ``I can't assist``, ... see :data:`REFUSAL_PREFIXES`), unless the transcript (or, without one,
    the prompt) says those words too, compared word by word without punctuation or apostrophes ("im sorry
    but", "i can not help" in an ASR transcript), so repeating or paraphrasing speech that says them is not a
    refusal. "I cannot" and "As an AI" alone are not refusals ("I cannot wait to ...", "As an AI researcher, she
    ..."): they were, and so was "I'm sorry, but ..." fixing the grammar of "im sorry but ...". "Sorry" in the
    middle of an answer never counts.
``repetition_loop``
    A block of 1-20 words repeats back to back at least 4 times, covering at least 12 words
    (greedy decoding stuck in a loop: "the cat the cat the cat the cat ...").
``truncated``
    Generation hit ``max_new_tokens`` (``finished`` is False) and the answer does not end a
    sentence (``. ! ?`` or ``…``, optionally followed by closing quotes/brackets). An answer that
    hits the cap exactly at a sentence end is kept.
"""
from __future__ import annotations

import difflib
import re

from nemo_speechlm.parts.metrics import plain_words

REASONS = ("empty", "repeats_prompt", "refusal", "repetition_loop", "truncated")

_REFUSED = ("help", "assist", "provide", "answer", "comply", "fulfill", "do that", "complete", "generate", "create",
            "write", "perform", "engage", "support")
REFUSAL_PREFIXES = (
    "i'm sorry, but",
    "i am sorry, but",
    "sorry, but i",
    "i apologize, but",
    "as an ai,",
    "as an ai language model",
    "as an ai assistant",
    "as an ai model",
    "as a language model",
    "as an artificial intelligence",
    *(f"{cannot} {verb}" for cannot in ("i cannot", "i can't", "i can not") for verb in _REFUSED),
    "i'm unable to",
    "i am unable to",
    "i'm not able to",
)

NEAR_MATCH_RATIO = 0.85
LOOP_MIN_REPEATS = 4
LOOP_MIN_WORDS = 12
LOOP_MAX_BLOCK = 20

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")


def degenerate_reason(answer: str, prompt: str, finished: bool, transcript: str | None = None) -> str | None:
    """The reason key (see module doc) why ``answer`` is not a usable answer to ``prompt``, or None.

    ``prompt`` is the user message the LLM answered; ``transcript`` the text it contains (if any),
    used to tell the instruction apart from the content and to avoid flagging faithful repeats.
    """
    answer = answer.strip()
    words = _words(answer)
    if not words:
        return "empty"
    if _repeats_prompt(words, prompt, transcript):
        return "repeats_prompt"
    if _is_refusal(answer, transcript if transcript is not None else prompt):
        return "refusal"
    if _has_loop(words):
        return "repetition_loop"
    if not finished and not _SENTENCE_END.search(answer):
        return "truncated"
    return None


def _words(text: str) -> list[str]:
    return _WORD.findall(_normalize_quotes(text).lower())


def _normalize_quotes(text: str) -> str:
    return text.replace("’", "'").replace("‘", "'")


def _ratio(a: list[str], b: list[str]) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a and b else 0.0


def _repeats_prompt(words: list[str], prompt: str, transcript: str | None) -> bool:
    prompt_words = _words(prompt)
    candidates = [prompt_words]
    content = 0.0
    if transcript:
        transcript_words = _words(transcript)
        content = _ratio(words, transcript_words)
        candidates.append(_without(prompt_words, transcript_words))
    best = max(_ratio(words, c) for c in candidates)
    return best >= NEAR_MATCH_RATIO and best > content


def _without(words: list[str], part: list[str]) -> list[str]:
    """``words`` with the first contiguous occurrence of ``part`` removed (unchanged if absent)."""
    for i in range(len(words) - len(part) + 1):
        if part and words[i : i + len(part)] == part:
            return words[:i] + words[i + len(part) :]
    return words


def _is_refusal(answer: str, context: str) -> bool:
    start = _normalize_quotes(answer).lstrip(" \"'“*-#>").lower()
    said = _plain_words(context)
    return any(start.startswith(p) and not _contains(said, _plain_words(p)) for p in REFUSAL_PREFIXES)


def _plain_words(text: str) -> list[str]:
    """The words as an ASR transcript may write them (``plain_words``), "cannot" as "can not"."""
    return [part for w in plain_words(text) for part in (("can", "not") if w == "cannot" else (w,))]


def _contains(words: list[str], part: list[str]) -> bool:
    return any(words[i:i + len(part)] == part for i in range(len(words) - len(part) + 1))


def _has_loop(words: list[str]) -> bool:
    """True if some block of ``n`` words repeats back to back (period-``n`` run) often enough."""
    for n in range(1, min(LOOP_MAX_BLOCK, len(words) // LOOP_MIN_REPEATS) + 1):
        run = 0  # consecutive positions i with words[i] == words[i + n]
        for i in range(len(words) - n):
            run = run + 1 if words[i] == words[i + n] else 0
            span = run + n  # words covered by the periodic stretch
            if span // n >= LOOP_MIN_REPEATS and span >= LOOP_MIN_WORDS:
                return True
    return False
