"""Written-to-spoken English text normalization for TTS.

The manifest transcript must be what the audio says. espeak reads digits and symbols
its own way ("$5" -> "dollar five"?), so we expand them ourselves first, speak the
expanded text, and write that same text into the manifest. Punctuation that shapes
prosody (. , ; : ! ? ') is kept; symbols with no sound are dropped.
"""
from __future__ import annotations

import re
import unicodedata

from num2words import num2words

__all__ = ["normalize_for_tts"]

_DIGIT_WORDS = "zero one two three four five six seven eight nine".split()

_CURRENCIES = {  # symbol -> (major singular, major plural, minor singular, minor plural)
    "$": ("dollar", "dollars", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "€": ("euro", "euros", "cent", "cents"),
    "¥": ("yen", "yen", "sen", "sen"),
}
_SCALES = r"thousand|million|billion|trillion"

_UNITS = {  # abbreviation after a number -> (singular, plural)
    "km": ("kilometer", "kilometers"),
    "kg": ("kilogram", "kilograms"),
    "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"),
    "ml": ("milliliter", "milliliters"),
    "mph": ("mile per hour", "miles per hour"),
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "lb": ("pound", "pounds"),
    "lbs": ("pound", "pounds"),
    "ft": ("foot", "feet"),
    "GB": ("gigabyte", "gigabytes"),
    "MB": ("megabyte", "megabytes"),
}

# Abbreviations that are always expanded the same way (case-sensitive, with their period).
_ABBREVIATIONS = {
    "Mr.": "Mister",
    "Mrs.": "Missus",
    "Ms.": "Miz",
    "Dr.": "Doctor",
    "Prof.": "Professor",
    "Mt.": "Mount",
    "Jr.": "Junior",
    "Sr.": "Senior",
    "vs.": "versus",
    "etc.": "et cetera",
    "e.g.": "for example",
    "i.e.": "that is",
    "approx.": "approximately",
    "Ave.": "Avenue",
    "Rd.": "Road",
    "Blvd.": "Boulevard",
}
# These may end a sentence; their period then doubles as the full stop.
_CAN_END_SENTENCE = {"etc.", "Jr.", "Sr.", "St.", "Ave.", "Rd.", "Blvd."}

_YEAR_CUES = {
    "in", "since", "by", "from", "until", "till", "of", "year", "before", "after", "circa",
    "around", "during", "early", "late", "mid", "summer", "winter", "spring", "autumn", "fall",
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december", "born", "founded", "built", "to", "and", "through",
}

_FRACTIONS = {2: ("half", "halves"), 4: ("quarter", "quarters")}


def _words(n: int, to: str = "cardinal") -> str:
    """num2words without its thousands commas ("one thousand, five hundred"): a comma is a pause."""
    return num2words(n, to=to).replace(",", "")


def _cardinal(digits: str) -> str:
    """Integer words; "007" reads digit by digit like people say it."""
    digits = digits.replace(",", "")
    if len(digits) > 1 and digits.startswith("0"):
        return " ".join(_DIGIT_WORDS[int(d)] for d in digits)
    return _words(int(digits))


def _number(text: str) -> str:
    """Integer or decimal ("3.50" -> "three point five zero", keeping every written digit)."""
    text = text.replace(",", "")
    negative = text.startswith("-")
    text = text.lstrip("-")
    whole, _, frac = text.partition(".")
    words = _cardinal(whole or "0")
    if frac:
        words += " point " + " ".join(_DIGIT_WORDS[int(d)] for d in frac)
    return ("minus " + words) if negative else words


def _is_one(text: str) -> bool:
    return text.replace(",", "") in ("1", "1.0", "1.00")


def _currency(m: re.Match) -> str:
    major1, major, minor1, minor = _CURRENCIES[m["sym"]]
    amount, scale = m["amount"], m["scale"]
    if scale:  # "$2.5 million" -> "two point five million dollars"
        return f"{_number(amount)} {scale.strip()} {major}"
    whole, _, cents = amount.replace(",", "").partition(".")
    words = f"{_cardinal(whole or '0')} {major1 if whole == '1' else major}"
    if cents and len(cents) == 2 and int(cents):
        words += f" and {_words(int(cents))} {minor1 if cents == '01' else minor}"
        if not whole or int(whole) == 0:
            words = f"{_words(int(cents))} {minor1 if cents == '01' else minor}"
    elif cents and int(cents):
        words = f"{_number(amount)} {major}"
    return words


def _time(m: re.Match) -> str:
    hours, minutes, ampm = int(m["h"]), int(m["m"]), m["ampm"]
    words = _words(hours)
    if minutes == 0:
        words += "" if ampm else " o'clock"
    elif minutes < 10:
        words += f" oh {_words(minutes)}"
    else:
        words += f" {_words(minutes)}"
    if ampm:
        words += f" {ampm[0].lower()}.m."
    return words


def _time_no_minutes(m: re.Match) -> str:
    return f"{_words(int(m['h']))} {m['ampm'][0].lower()}.m."


def _ordinal(m: re.Match) -> str:
    return _words(int(m[1].replace(",", "")), to="ordinal")


def _decade(m: re.Match) -> str:
    n = int(m[1])
    words = _words(n, to="year") if n >= 1000 else _words(n)
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _year_or_number(m: re.Match, text: str) -> str:
    """A four-digit number after a cue word ("in 1999") or before BC/AD is a year."""
    before = text[: m.start()].split()
    prev = before[-1].strip(",;:").lower() if before else ""
    after = text[m.end():].lstrip()
    if prev in _YEAR_CUES or re.match(r"(BC|AD|BCE|CE)\b", after):
        return _words(int(m[0]), to="year")
    return _cardinal(m[0])


def _digit_groups(m: re.Match) -> str:
    return ", ".join(" ".join(_DIGIT_WORDS[int(d)] for d in group) for group in m[0].split("-"))


def _fraction(m: re.Match) -> str:
    num, den = int(m[1]), int(m[2])
    if not (0 < num < den <= 10):  # "24/7", "9/11": read the two numbers
        return f"{_words(num)} {_words(den)}"
    if den in _FRACTIONS:
        name = _FRACTIONS[den][num != 1]
    else:
        name = _words(den, to="ordinal") + ("s" if num != 1 else "")
    return f"{'a' if num == 1 else _words(num)} {name}"


def _unit(m: re.Match) -> str:
    singular, plural = _UNITS[m["unit"]]
    return f"{_number(m['n'])} {singular if _is_one(m['n']) else plural}"


def _abbreviation(m: re.Match, text: str) -> str:
    abbr = m[0]
    after = text[m.end():]
    if abbr == "St.":  # "St. Paul" is a saint, "Main St." a street
        words = "Saint" if re.match(r"\s+[A-Z]", after) else "Street"
    else:
        words = _ABBREVIATIONS[abbr]
    ends_sentence = not after.strip() or re.match(r"\s+[A-Z]", after)
    if abbr in _CAN_END_SENTENCE and ends_sentence and not (abbr == "St." and words == "Saint"):
        words += "."
    return words


def _clean_unicode(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    for src, dst in {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
                     "\u2013": "-", "\u2014": " - ", "\u00a0": " ", "\u00d7": " times "}.items():
        text = text.replace(src, dst)
    return text


def _tidy_punctuation(text: str) -> str:
    """Drop soundless symbols and make every whitespace token carry a spoken word."""
    text = re.sub(r"\s+-{1,2}\s+|\s*--+\s*", ", ", text)  # spaced dashes are pauses
    text = re.sub(r"[\"()\[\]{}<>*_~|\\^`#]", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # "word ," -> "word,"
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # ", ," -> ","
    text = re.sub(r",(\s*[.!?])", r"\1", text)
    tokens = text.split()
    out: list[str] = []
    for tok in tokens:  # a token with nothing to say sticks to the previous word
        if not any(c.isalnum() for c in tok):
            if out:
                out[-1] += tok.strip("'-")
            continue
        out.append(tok)
    return " ".join(out).strip(" ,;:")


def normalize_for_tts(text: str) -> str:
    """Expand numbers, currency, times, abbreviations and symbols into speakable words.

    The result is both what the TTS engine reads and the transcript we store, so the two
    never disagree. Examples: "$5" -> "five dollars", "21st" -> "twenty-first",
    "in 1999" -> "in nineteen ninety-nine", "3:30 pm" -> "three thirty p.m.",
    "Dr. Smith" -> "Doctor Smith", "50%" -> "fifty percent".

    Applied until the text stops changing (a few rules make text another pass changes, e.g. "good ——?" ->
    "good,?" -> "good?"): what is spoken then normalizes to itself, which a resumed mixed-modal run relies on
    (its TTS normalizes the planned text again; a line whose two differed was made anew on every run).
    """
    for _ in range(4):
        normalized = _normalize_once(text)
        if normalized == text:
            break
        text = normalized
    return text


def _normalize_once(text: str) -> str:
    text = _clean_unicode(text)
    abbr_re = "|".join(re.escape(a) for a in sorted([*_ABBREVIATIONS, "St."], key=len, reverse=True))
    text = re.sub(rf"(?<![\w.])(?:{abbr_re})", lambda m: _abbreviation(m, text), text)
    text = re.sub(r"\bNo\.\s?(?=\d)", "number ", text)
    text = re.sub(r"#\s?(?=\d)", "number ", text)

    num = r"\d[\d,]*(?:\.\d+)?"
    syms = "".join(re.escape(s) for s in _CURRENCIES)
    text = re.sub(rf"(?P<sym>[{syms}])\s?(?P<amount>{num}|\.\d+)(?P<scale>\s+(?:{_SCALES})\b)?", _currency, text)
    text = re.sub(r"\b(?P<h>\d{1,2}):(?P<m>\d{2})\b(?:\s?(?P<ampm>[aApP]\.?[mM]\b\.?))?", _time, text)
    text = re.sub(r"\b(?P<h>\d{1,2})\s?(?P<ampm>[aApP]\.?[mM]\b\.?)", _time_no_minutes, text)
    text = re.sub(rf"(-?{num})\s?%", lambda m: f"{_number(m[1])} percent", text)
    signed = rf"(?<!\w)-?{num}"  # "-5°C" is minus five ("10-20°C" keeps its range hyphen); it lost its minus
    text = re.sub(rf"({signed})\s?°\s?([CF])\b",
                  lambda m: f"{_number(m[1])} degrees {'Celsius' if m[2] == 'C' else 'Fahrenheit'}", text)
    text = re.sub(r"°", " degrees", text)
    text = re.sub(r"\b(\d[\d,]*)(?:st|nd|rd|th)\b", _ordinal, text)
    text = re.sub(r"\b(1[1-9]\d0|20\d0)'?s\b", _decade, text)
    text = re.sub(r"(?<![\w'])'?([2-9]0)'?s\b", _decade, text)  # "the 80s"
    units = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
    text = re.sub(rf"(?P<n>{signed})\s?(?P<unit>{units})(?![\w/])", _unit, text)
    text = re.sub(r"(?<=\d)(?=[A-Za-z])|(?<=[A-Za-z])(?=\d)", " ", text)  # "3D", "MP3"
    text = re.sub(r"\b\d{3}-\d{3,4}(?:-\d{4})?\b", _digit_groups, text)  # phone numbers
    text = re.sub(r"\b(\d+)\s?-\s?(\d+)\b", lambda m: f"{_number(m[1])} to {_number(m[2])}", text)
    text = re.sub(r"\b(\d+)/(\d+)\b", _fraction, text)
    text = re.sub(r"(?<![\d,])\b(1[1-9]\d\d|20\d\d)\b(?![,.]?\d)", lambda m: _year_or_number(m, text), text)
    text = re.sub(r"(?<![\w-])-(?=\d)", "minus ", text)
    text = re.sub(num, lambda m: _number(m[0].rstrip(",")) + ("," if m[0].endswith(",") else ""), text)

    text = re.sub(r"\s*&\s*", " and ", text)
    text = re.sub(r"(?<=\w)\s*\+\s*(?=\w)", " plus ", text)
    text = re.sub(r"\s*=\s*", " equals ", text)
    text = re.sub(r"\s*%", " percent", text)
    text = re.sub(r"(?<=\s)@(?=\s)", "at", text)
    text = re.sub(r"(?<=[A-Za-z])/(?=[A-Za-z])", " or ", text)
    text = re.sub(r"[+@/]", " ", text)
    return _tidy_punctuation(text)

