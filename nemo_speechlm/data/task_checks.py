"""Task-following checks: did the answer do what the task asked, whatever its content?

A reference answer says how close an answer is to the text LLM's; these checks say whether
it has the right form (one sentence, a short title, a list of keywords, French, ...). They
are cheap offline heuristics with documented limits, not judges.

Each check is ``check(answer, transcript, **params) -> bool`` and is registered by name in
:data:`TASK_CHECKS`. A task catalog names its check with a spec: either the name
(``"one_sentence"``) or a mapping with the name and its parameters
(``{"name": "short", "max_words": 8}``); :func:`run_check` applies a spec and
:func:`resolve_check` validates one without an answer.
"""
import inspect
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

from nemo_speechlm.parts.metrics import is_transcript_copy, normalize_english, utterance_wer

# --------------------------------------------------------------------------- text helpers

# A period after these never ends a sentence: titles before a name, and "e.g."/"i.e."/"vs."
# before more of the same sentence.
_NON_FINAL_ABBREVIATIONS = {
    "dr", "mr", "mrs", "ms", "prof", "st", "mt", "vs", "e.g", "i.e", "cf", "approx",
    "gen", "col", "lt", "capt", "sgt", "rev", "hon", "fig",
}
# These end a sentence only when the next word is capitalized ("at 5 p.m. The ...").
_MAYBE_FINAL_ABBREVIATIONS = {"etc", "jr", "sr", "inc", "ltd", "co", "corp", "a.m", "p.m", "u.s", "u.k"}

# Candidate boundaries: sentence punctuation, optional closing quotes/brackets, then a space
# or the end. A period inside "3.5" or "e.g" is followed by a character, so it is no candidate.
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]*]*(?=\s|$)")


def _ends_sentence(line: str, start: int, boundary: re.Match) -> bool:
    rest = line[boundary.end():].lstrip()
    if not rest:
        return True
    punct = boundary.group()
    if "!" in punct or "?" in punct or "…" in punct or ".." in punct:
        return not rest[0].islower()  # '"Done?" she asked.', 'It sat... and slept.'
    before = line[start: boundary.start()].split()
    word = before[-1].lstrip("\"'“‘([*").lower() if before else ""
    if word in _NON_FINAL_ABBREVIATIONS or (len(word) == 1 and word.isalpha()):  # "J. K. Rowling"
        return False
    if len(before) == 1 and word.isdigit():  # a list number: "1. First point."
        return False
    if word in _MAYBE_FINAL_ABBREVIATIONS or "." in word:  # dotted tokens: "U.S.", "3.5."
        return rest[0].isupper()
    return True


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a small rule-based splitter.

    Rules: a line break always ends a sentence; "!", "?" and "..." end one unless a
    lower-case word follows; a period followed by a space ends one, except after titles and
    "e.g."-like abbreviations (never), after a list number at the start of a sentence
    ("1."), and after "etc.", "p.m." and other dotted tokens (only before a capital letter);
    text after the last punctuation is a sentence of its own. (NLTK's punkt would need a
    data download; the answers checked here are short LLM outputs.)
    """
    sentences = []
    for line in text.splitlines():
        start = 0
        for boundary in _BOUNDARY.finditer(line):
            if _ends_sentence(line, start, boundary):
                sentences.append(line[start:boundary.end()].strip())
                start = boundary.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def _words(text: str) -> list[str]:
    """Whitespace-separated tokens that hold a letter or digit (a lone "-" is no word)."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


_BULLET = re.compile(r"^\s*(?:[-*•·–]|\d+[.)])\s+")
_LABEL = re.compile(r"^\s*([^:]{1,40}):\s*(.*)$")  # "Keywords: a, b, c"


def _list_items(text: str) -> list[str]:
    """Items of a comma-, semicolon-, line- or bullet-separated list, with an optional
    leading label of up to three words ("Keywords:") removed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines and (label := _LABEL.match(lines[0])) and len(label.group(1).split()) <= 3:
        lines[0] = label.group(2)
    items = []
    for line in lines:
        for part in re.split(r"[,;]", _BULLET.sub("", line)):
            part = re.sub(r"^(?:and|or)\s+", "", part.strip(" .\"'“”‘’*"), flags=re.IGNORECASE)
            if part:
                items.append(part)
    return items


# --------------------------------------------------------------------------- language guess
# Frequent function words per language. Words listed for two languages ("de", "la", "en",
# "in", "es", "du", ...) are dropped from both since they cannot tell them apart; some
# entries are there only for that (English "me", "so", "war").
_STOPWORDS = {
    "en": """the a an and or but of to in on at by for with from about into is are was were be
        been has have had do does did will would can could should it its this that these those
        there they them their he she his her him we us our you your i me my not no what which who
        how when where why if than then so as also very just all some more because war""",
    "fr": """le la les l un une des du de d au aux et ou mais donc est sont était été être avoir
        a ont avait il elle ils elles on nous vous je j tu ce cette ces c qui que qu quoi dont où
        dans sur pour par avec sans sous pas ne n plus très aussi son sa ses leur leurs en comme
        tout tous mon ma mes entre""",
    "es": """el la los las un una unos unas de del al y o pero es son era fue ser estar está
        están hay ha han que qué quien cual en con por para sin sobre entre no sí se su sus lo muy
        más también como cuando donde este esta estos esto ese esa yo tú él ella nosotros ellos
        mi me te nos""",
    "de": """der die das den dem des ein eine einen einem einer und oder aber ist sind war waren
        wird werden hat haben nicht kein keine mit auf für von zu zum zur im in an bei nach aus
        über unter ich du er sie es wir ihr sich auch noch nur sehr so wie was wenn dass als kann
        können mir mich dir""",
}
_SETS = {lang: set(words.split()) for lang, words in _STOPWORDS.items()}
LANGUAGE_MARKERS = {
    lang: frozenset(words - set().union(*(other for o, other in _SETS.items() if o != lang)))
    for lang, words in _SETS.items()
}


def language_counts(text: str) -> dict[str, int]:
    """How many of the text's words are distinctive function words of each language."""
    tokens = re.findall(r"[^\W\d_]+", unicodedata.normalize("NFC", text).lower())
    return {lang: sum(t in markers for t in tokens) for lang, markers in LANGUAGE_MARKERS.items()}


# --------------------------------------------------------------------------- parameter checks


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


# --------------------------------------------------------------------------- the checks


def nonempty(answer: str, transcript: str) -> bool:
    """The answer has some non-whitespace text."""
    return bool(answer.strip())


def one_sentence(answer: str, transcript: str) -> bool:
    """Exactly one sentence (see :func:`split_sentences`), e.g. a one-sentence summary."""
    return len(split_sentences(answer)) == 1


def short(answer: str, transcript: str, max_words: int = 12) -> bool:
    """One non-empty line of at most ``max_words`` words, e.g. a title."""
    _require_int("max_words", max_words, 1)
    text = answer.strip()
    return bool(text) and "\n" not in text and len(_words(text)) <= max_words


def keyword_list(
    answer: str, transcript: str, min_items: int = 2, max_items: int = 15, max_words_per_item: int = 4
) -> bool:
    """A list of ``min_items``..``max_items`` short items (at most ``max_words_per_item``
    words each), separated by commas, semicolons, line breaks or bullets/numbers.

    Limit: a sentence whose commas cut it into short pieces ("The cat, which was black, sat
    down.") also passes.
    """
    _require_int("min_items", min_items, 1)
    _require_int("max_items", max_items, min_items)
    _require_int("max_words_per_item", max_words_per_item, 1)
    items = _list_items(answer)
    return min_items <= len(items) <= max_items and all(len(_words(i)) <= max_words_per_item for i in items)


def question(answer: str, transcript: str) -> bool:
    """The answer's first (or only) sentence is a question ending with "?"."""
    sentences = split_sentences(answer)
    return bool(sentences) and sentences[0].rstrip("\"'”’)]*").endswith("?")


def language(answer: str, transcript: str, lang: str = "en") -> bool:
    """The answer is mostly in ``lang`` (fr, de, es or en), hence, for fr/de/es, not English.

    Heuristic: among the answer's distinctive function words (:data:`LANGUAGE_MARKERS`),
    those of ``lang`` must outnumber those of all other languages together. Limits: an answer
    with no function words (a single word, a list of nouns) fails; closely related languages
    outside the four (Italian, Portuguese, Dutch) can pass as Spanish, French or German; a
    translation that keeps an English preamble ("Here is the translation: ...") passes only
    if the translation is longer than the preamble.
    """
    if lang not in LANGUAGE_MARKERS:
        raise ValueError(f"lang must be one of {sorted(LANGUAGE_MARKERS)}, got {lang!r}")
    counts = language_counts(answer)
    others = sum(n for other, n in counts.items() if other != lang)
    return counts[lang] > others


def one_of(answer: str, transcript: str, labels: Sequence[str] = ()) -> bool:
    """Exactly one of ``labels`` occurs in the answer as a whole word or phrase
    (case-insensitive), e.g. sentiment or topic classification."""
    return len(named_labels(answer, labels)) == 1


def named_labels(answer: str, labels: Sequence[str]) -> set[str]:
    """The ``labels`` (lower-cased) that occur in the answer as whole words or phrases, case-insensitive."""
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"labels must be non-empty strings, got {list(labels)!r}")
    return {
        label.lower()
        for label in labels
        if re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, label.split())) + r"(?!\w)", answer, re.IGNORECASE)
    }


def shorter_than_input(answer: str, transcript: str, ratio: float = 1.0) -> bool:
    """A non-empty answer of at most ``ratio`` x the transcript's word count (summaries)."""
    _require_number("ratio", ratio)
    n_words = len(_words(answer))
    return n_words > 0 and n_words <= ratio * len(_words(transcript))


def close_to_input(answer: str, transcript: str, max_wer: float = 0.5) -> bool:
    """A non-empty answer whose normalized WER against the transcript is at most
    ``max_wer`` (repeat, fix-the-grammar and similar tasks)."""
    _require_number("max_wer", max_wer)
    return bool(normalize_english(answer)) and utterance_wer(transcript, answer) <= max_wer


def differs_from_input(answer: str, transcript: str) -> bool:
    """A non-empty answer that is not a copy of the transcript (see
    :func:`~nemo_speechlm.parts.metrics.is_transcript_copy`), e.g. a paraphrase."""
    return bool(answer.strip()) and not is_transcript_copy(answer, transcript)


_YES_NO = re.compile(r"^[\W_]*(yes|no)(?![^\W_])", re.IGNORECASE)


def yes_no(answer: str, transcript: str) -> bool:
    """The answer starts with "yes" or "no" ("**No.**", "Yes, because ..."; not "Nope")."""
    return bool(yes_no_label(answer))


def yes_no_label(answer: str) -> set[str]:
    """``{"yes"}`` or ``{"no"}`` for an answer that starts with it (see :func:`yes_no`), else empty."""
    match = _YES_NO.match(answer)
    return {match.group(1).lower()} if match else set()


TASK_CHECKS: dict[str, Callable[..., bool]] = {
    "nonempty": nonempty,
    "one_sentence": one_sentence,
    "short": short,
    "keyword_list": keyword_list,
    "question": question,
    "language": language,
    "one_of": one_of,
    "shorter_than_input": shorter_than_input,
    "close_to_input": close_to_input,
    "differs_from_input": differs_from_input,
    "yes_no": yes_no,
}

# The classification checks: which of their labels an answer gives (the benchmark scores agreement on it).
_LABEL_READERS: dict[Callable[..., bool], Callable[..., set[str]]] = {
    one_of: named_labels,
    yes_no: yes_no_label,
}


# --------------------------------------------------------------------------- specs


def _known() -> str:
    return "known checks: " + ", ".join(sorted(TASK_CHECKS))


def resolve_check(spec: str | Mapping) -> tuple[Callable[..., bool], dict]:
    """The check function and parameters a spec names; raises ``ValueError`` (listing the
    known checks) for an unknown name or bad parameters, so a task catalog can be validated
    when it is loaded rather than halfway through an evaluation."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"task check spec {dict(spec)!r} has no 'name'; {_known()}")
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ValueError(f"a task check spec is a name or a mapping with 'name', got {spec!r}; {_known()}")
    if name not in TASK_CHECKS:
        raise ValueError(f"unknown task check {name!r}; {_known()}")
    check = TASK_CHECKS[name]
    try:
        inspect.signature(check).bind("", "", **params)
        check("", "", **params)  # the checks validate their parameter values first
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad parameters {params!r} for task check {name!r}: {e}; {_known()}") from e
    return check, params


def answer_labels(spec: str | Mapping, answer: str) -> set[str] | None:
    """The labels an answer gives under a classification check (``one_of``, ``yes_no``), lower-cased;
    None for a check that is not a classification."""
    check, params = resolve_check(spec)
    reader = _LABEL_READERS.get(check)
    return None if reader is None else reader(answer, **params)


def run_check(spec: str | Mapping, answer: str, transcript: str) -> bool:
    """Apply the check named by ``spec`` to an answer and the transcript it answers."""
    check, params = resolve_check(spec)
    for name, value in (("answer", answer), ("transcript", transcript)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return bool(check(answer, transcript, **params))
