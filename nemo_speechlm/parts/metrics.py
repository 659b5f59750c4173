"""Text metrics for scoring a speech LLM's answers.

Thin wrappers over the standard libraries, so every evaluation in the project normalizes
and counts the same way: jiwer (WER/CER), sacrebleu (BLEU/chrF), rouge_score (ROUGE-L) and
Whisper's English text normalizer.

Argument order is always ``(reference(s), hypothesis/prediction(s))``, also where the
library underneath takes hypotheses first (sacrebleu).

Empty and missing input:
- ``None`` or any other non-string text raises ``TypeError`` naming the argument (and the
  index inside a list); a single string passed where a list is expected raises ``TypeError``
  too (it would otherwise be scored character by character).
- Lists of different lengths, or empty lists, raise ``ValueError``.
- An empty string is a valid answer (a model may say nothing) and gets a defined score:
  an error rate over a reference with no words/characters is 0.0 when the hypothesis is
  empty too and ``inf`` otherwise (NeMo's ``word_error_rate`` convention; jiwer would report
  the insertion count); BLEU, chrF and ROUGE-L of an empty side are 0.0 (the libraries'
  own values); ``exact_match`` compares the (normalized) strings, so two empty strings match;
  ``is_transcript_copy`` is False when either side is empty.
"""
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib.resources import files

import jiwer
import sacrebleu
from sacrebleu.metrics import BLEU
from rouge_score import rouge_scorer, tokenizers
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

from nemo_speechlm.errors import InputError

logger = logging.getLogger(__name__)

TRANSCRIPT_COPY_MAX_WER = 0.1


# --------------------------------------------------------------------------- normalization


def _load_spelling_mapping() -> dict[str, str]:
    """OpenAI's British->American spelling table (``english.json``, 1.7k words).

    transformers' ``EnglishTextNormalizer`` takes the table as an argument and normally gets
    it with a Whisper tokenizer from the model hub, which is unreachable offline. The
    ``whisper_normalizer`` package, installed with ``nemo_toolkit[asr]``, ships the same file.
    """
    try:
        text = files("whisper_normalizer").joinpath("normalizers/english.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        logger.warning(
            "whisper_normalizer (with normalizers/english.json) is not installed: English "
            "normalization runs without British->American spelling standardization."
        )
        return {}
    return json.loads(text)


@lru_cache(maxsize=1)
def _english_normalizer() -> EnglishTextNormalizer:
    # transformers' class rather than whisper_normalizer's own (which NeMo's speechlm2 metrics
    # use): transformers' copy is OpenAI's code verbatim, while whisper_normalizer adds rules
    # ("cause" -> "because", "kinda", ...) that make scores differ from Whisper-style ones.
    return EnglishTextNormalizer(_load_spelling_mapping())


def normalize_english(text: str) -> str:
    """Whisper's English normalization: lower case, no punctuation, "Mr." -> "mister",
    spelled numbers -> digits ("twenty dollars" -> "$20"), American spelling, fillers removed.

    Meant for English; other languages lose their diacritics ("était" -> "etait") and may
    meet English contraction rules, which is harmless for equality tests but not a proper
    normalization for them.
    """
    _require_text(text, "text")
    return _english_normalizer()(text).strip()


def plain_words(text: str) -> list[str]:
    """Words as an aligner or an ASR transcript may write them: NFKC, lower case, apostrophes dropped ("Don't" ->
    "dont"), punctuation gone. For "are these the same words?" checks, where a normalizer's spelling rules (numbers,
    British spelling) would be too much."""
    text = unicodedata.normalize("NFKC", text).lower().replace("'", "").replace("\u2019", "")
    return re.findall(r"[^\W_]+", text)


# Languages written without spaces between words: their "words" are characters (WER over characters, as Whisper's
# paper and FLEURS results report them); split on spaces, a whole sentence was one word (WER 1.0 for one wrong
# character).
UNSPACED_LANGUAGES = ("zh", "ja", "th", "lo", "my", "km")


def primary_language(code: str | None) -> str:
    """The primary subtag of a language code, lower case (``zh-CN``, ``ZH``, ``zh_TW`` -> ``zh``; None -> "")."""
    return (code or "").strip().lower().replace("_", "-").split("-")[0]


def normalize_for_language(text: str, language: str | None = None) -> str:
    """Whisper's normalization for ``language``: the English normalizer for English (or no language given), its basic
    one (lower case, no punctuation or symbols, diacritics kept) otherwise; the English one stripped other
    languages' diacritics ("Straße größer" -> "strasse grosser") and applied English spelling rules. Unspaced
    languages come back with a space between characters, so word counts are character counts."""
    _require_text(text, "text")
    primary = primary_language(language)
    if primary in ("", "en"):
        return _english_normalizer()(text).strip()
    text = _basic_normalizer()(text).strip()
    return " ".join(c for c in text if not c.isspace()) if primary in UNSPACED_LANGUAGES else text


@lru_cache(maxsize=1)
def _basic_normalizer() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def _prepared(texts: Sequence[str], normalize: bool, languages: Sequence[str | None] | None) -> list[str]:
    languages = list(languages) if languages is not None else [None] * len(texts)
    if len(languages) != len(texts):
        raise ValueError(f"got {len(languages)} languages for {len(texts)} texts")
    if normalize:
        return [normalize_for_language(t, lang) for t, lang in zip(texts, languages)]
    return [" ".join(c for c in t if not c.isspace()) if primary_language(lang) in UNSPACED_LANGUAGES else t
            for t, lang in zip(texts, languages)]


# --------------------------------------------------------------------------- input checks


def _require_text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")


def _require_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    for name, values in (("references", references), ("hypotheses", hypotheses)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
        for i, value in enumerate(values):
            _require_text(value, f"{name}[{i}]")
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("references and hypotheses are empty: nothing to score")


def _rate(errors: int, reference_units: int) -> float:
    """Errors per reference unit; a reference with nothing in it scores 0 only if nothing was said."""
    if reference_units == 0:
        return 0.0 if errors == 0 else math.inf
    return errors / reference_units


# --------------------------------------------------------------------------- WER / CER


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True,
                    languages: Sequence[str | None] | None = None) -> dict:
    """Corpus WER (total edits / total reference words) and its counts, via jiwer.

    Returns ``{"wer", "substitutions", "deletions", "insertions", "hits", "reference_words"}``.
    ``normalize`` applies :func:`normalize_for_language` to both sides first (each pair in its ``languages``
    entry; English when not given); without it, words are whitespace-separated tokens compared exactly. Words of
    unspaced languages (``UNSPACED_LANGUAGES``) are characters either way.
    """
    _require_pairs(references, hypotheses)
    references, hypotheses = _prepared(references, normalize, languages), _prepared(hypotheses, normalize, languages)
    out = jiwer.process_words(list(references), list(hypotheses))
    n_ref = out.hits + out.substitutions + out.deletions
    return {
        "wer": _rate(out.substitutions + out.deletions + out.insertions, n_ref),
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "hits": out.hits,
        "reference_words": n_ref,
    }


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True,
                    languages: Sequence[str | None] | None = None) -> dict:
    """Corpus CER and its counts, via jiwer; spaces count as characters (jiwer's default), except in unspaced
    languages, whose text has none (normalized per ``languages`` as :func:`word_error_rate` does).

    Returns ``{"cer", "substitutions", "deletions", "insertions", "hits", "reference_chars"}``.
    """
    _require_pairs(references, hypotheses)
    references, hypotheses = _prepared(references, normalize, languages), _prepared(hypotheses, normalize, languages)
    unspaced = [primary_language(lang) in UNSPACED_LANGUAGES for lang in (languages or [None] * len(references))]
    references = [r.replace(" ", "") if u else r for r, u in zip(references, unspaced)]
    hypotheses = [h.replace(" ", "") if u else h for h, u in zip(hypotheses, unspaced)]
    out = jiwer.process_characters(list(references), list(hypotheses))
    n_ref = out.hits + out.substitutions + out.deletions
    return {
        "cer": _rate(out.substitutions + out.deletions + out.insertions, n_ref),
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "hits": out.hits,
        "reference_chars": n_ref,
    }


def utterance_wer(reference: str, hypothesis: str, normalize: bool = True, language: str | None = None) -> float:
    """WER of one utterance, for per-utterance output (0.0 / inf for an empty reference)."""
    _require_text(reference, "reference")
    _require_text(hypothesis, "hypothesis")
    return word_error_rate([reference], [hypothesis], normalize=normalize, languages=[language])["wer"]


# --------------------------------------------------------------------------- BLEU / chrF
# sacrebleu's defaults on raw (detokenized) text: BLEU with the 13a tokenizer and exp
# smoothing, chrF2 (character 6-grams, beta 2). No normalization, so scores are comparable
# with published sacrebleu numbers. 13a splits on spaces and punctuation, so a Chinese or Japanese
# sentence is one "word" (BLEU ~0 short of an exact match); those targets take the tokenizers their
# published numbers use.
BLEU_TOKENIZERS = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}  # target language -> sacrebleu tokenizer
_TOKENIZER_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}


def bleu_tokenizer(target_lang: str | None) -> str:
    """sacrebleu's tokenizer for a target language code (13a unless listed in ``BLEU_TOKENIZERS``), by its primary
    subtag in any case: ``zh-CN``, ``ZH`` and ``ja_JP`` took 13a, which scores a Chinese sentence as one word."""
    return BLEU_TOKENIZERS.get(primary_language(target_lang), "13a")


def check_bleu_tokenizer(target_lang: str | None) -> None:
    """Raise :class:`InputError` now (before any answering) if BLEU cannot tokenize ``target_lang`` here."""
    _bleu_tokenize(bleu_tokenizer(target_lang))


@lru_cache(maxsize=None)
def _bleu_tokenize(name: str) -> Callable[[str], str]:
    try:
        return BLEU(tokenize=name).tokenizer
    except (ImportError, RuntimeError) as e:  # the MeCab tokenizers need extra packages (sacrebleu raises either)
        raise InputError(f"BLEU with sacrebleu's {name} tokenizer (the one published scores use for this language) "
                         f"needs packages that are not installed ({' '.join(str(e).split())})",
                         f"pip install '{_TOKENIZER_EXTRAS.get(name, 'sacrebleu')}'") from None


def bleu(references: Sequence[str], hypotheses: Sequence[str],
         target_langs: str | Sequence[str | None] | None = None) -> float:
    """Corpus BLEU (0-100), one reference per hypothesis; each pair tokenized for its target language
    (``target_langs``: one code for all, or one per pair), which lets one corpus mix languages."""
    _require_pairs(references, hypotheses)
    langs = [target_langs] * len(references) if target_langs is None or isinstance(target_langs, str) else list(target_langs)
    if len(langs) != len(references):
        raise ValueError(f"{len(references)} references but {len(langs)} target languages")
    tokenizers = [_bleu_tokenize(bleu_tokenizer(lang)) for lang in langs]
    refs = [tokenize(r.rstrip()) for tokenize, r in zip(tokenizers, references)]
    hyps = [tokenize(h.rstrip()) for tokenize, h in zip(tokenizers, hypotheses)]
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score  # as sacrebleu's own, each pair pre-tokenized


def chrf(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus chrF (0-100), one reference per hypothesis."""
    _require_pairs(references, hypotheses)
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score


def sentence_bleu(reference: str, hypothesis: str, target_lang: str | None = None) -> float:
    """BLEU (0-100) of one item; sacrebleu's sentence variant (effective order, exp smoothing), tokenized for
    ``target_lang`` (see :func:`bleu`)."""
    _require_text(reference, "reference")
    _require_text(hypothesis, "hypothesis")
    tokenize = _bleu_tokenize(bleu_tokenizer(target_lang))
    return sacrebleu.sentence_bleu(tokenize(hypothesis.rstrip()), [tokenize(reference.rstrip())], tokenize="none").score


def sentence_chrf(reference: str, hypothesis: str) -> float:
    """chrF (0-100) of one item."""
    _require_text(reference, "reference")
    _require_text(hypothesis, "hypothesis")
    return sacrebleu.sentence_chrf(hypothesis, [reference]).score


# --------------------------------------------------------------------------- ROUGE-L / EM


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana, CJK ideographs (+ extension A, compatibility)
_WORD_OR_CJK_CHARACTER = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class _UnicodeWordTokenizer(tokenizers.Tokenizer):
    """rouge_score's default tokenizer keeps only [a-z0-9] and would turn "était" into "tait"
    (and erase non-Latin text); answers here can be French, German or Spanish. On ASCII text
    this gives the same tokens as the default: lower-cased runs of letters and digits. Chinese and
    Japanese characters are a token each (those scripts put no spaces between words: a whole sentence
    was one token, and ROUGE-L 0 or 1)."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD_OR_CJK_CHARACTER.findall(text.lower())


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    # No stemming: the Porter stemmer is English-only, and reference and prediction are
    # answers of the same LLM, whose exact word forms are part of what should match.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeWordTokenizer())


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure (0-1) from the longest common word subsequence; 0.0 if a side is empty."""
    _require_text(reference, "reference")
    _require_text(prediction, "prediction")
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


def exact_match(reference: str, prediction: str, normalize: bool = True) -> bool:
    """Whether the two strings are equal after :func:`normalize_english` (or after stripping
    surrounding whitespace when ``normalize`` is False)."""
    _require_text(reference, "reference")
    _require_text(prediction, "prediction")
    if normalize:
        return normalize_english(reference) == normalize_english(prediction)
    return reference.strip() == prediction.strip()


def is_transcript_copy(answer: str, transcript: str, threshold: float = TRANSCRIPT_COPY_MAX_WER) -> bool:
    """Whether the answer is (nearly) just the transcript: a common failure of speech LLMs,
    which repeat what they heard instead of doing the task.

    Rule: after :func:`normalize_english` on both, the WER of the answer against the
    transcript is at most ``threshold`` (default 0.1: about one edit per ten transcript
    words). An empty answer or transcript is not a copy. A short prefix such as "The audio
    says:" counts as insertions, so it still passes as a copy only on long transcripts.
    """
    _require_text(answer, "answer")
    _require_text(transcript, "transcript")
    if not normalize_english(answer) or not normalize_english(transcript):
        return False
    return utterance_wer(transcript, answer) <= threshold
