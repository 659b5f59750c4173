"""Evaluation metrics and task-following checks, against values counted by hand."""
import math

import pytest

from nemo_speechlm.errors import InputError

from nemo_speechlm.data.task_checks import TASK_CHECKS, resolve_check, run_check, split_sentences
from nemo_speechlm.parts.metrics import (
    bleu,
    char_error_rate,
    chrf,
    exact_match,
    is_transcript_copy,
    normalize_english,
    rouge_l,
    sentence_bleu,
    sentence_chrf,
    utterance_wer,
    word_error_rate,
)

TRANSCRIPT = "the quick brown fox jumps over the lazy dog today"  # 10 words

# --------------------------------------------------------------------------- WER / CER


def test_wer_counts_by_hand():
    # REF: the  ***  cat  sat  on  the  mat
    # HYP: the  big  cat  sit  on  ***  mat
    #           I         S         D          -> 3 edits / 6 reference words.
    # Both sides have 6 words, so a minimal alignment has as many insertions as deletions;
    # all-substitution alignment costs 4, so S=1, D=1, I=1 is the only minimum.
    out = word_error_rate(["the cat sat on the mat"], ["the big cat sit on mat"], normalize=False)
    assert out == {
        "wer": 0.5, "substitutions": 1, "deletions": 1, "insertions": 1, "hits": 4, "reference_words": 6,
    }


def test_corpus_wer_is_total_edits_over_total_words():
    refs = ["the cat sat on the mat", "hello there world"]
    hyps = ["the big cat sit on mat", "hello world"]  # second: one deletion
    out = word_error_rate(refs, hyps)
    assert (out["substitutions"], out["deletions"], out["insertions"]) == (1, 2, 1)
    assert out["wer"] == pytest.approx(4 / 9)  # not the mean of 3/6 and 1/3


def test_normalization_makes_spelling_variants_equal():
    ref, hyp = "Mr. Smith paid twenty dollars.", "mister smith paid $20"
    assert normalize_english(ref) == "mister smith paid $20"
    assert normalize_english("The colour is GREY!") == "the color is gray"  # spelling table loaded
    assert utterance_wer(ref, hyp) == 0.0
    # Raw tokens: Mr./mister S, Smith/smith S, paid hit, twenty/$20 S, dollars. D -> 4/5.
    assert utterance_wer(ref, hyp, normalize=False) == pytest.approx(0.8)


def test_empty_references_have_defined_wer():
    assert utterance_wer("", "") == 0.0
    assert utterance_wer("Um.", "") == 0.0  # fillers normalize away
    assert utterance_wer("", "hello") == math.inf
    assert word_error_rate(["a b", ""], ["a b", "c"])["wer"] == 0.5  # 1 insertion / 2 words


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match=r"hypotheses\[0\]"):
        word_error_rate(["a"], [None])
    with pytest.raises(TypeError, match="list of strings"):
        word_error_rate("a b", "a b")
    with pytest.raises(ValueError, match="1 references but 2 hypotheses"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        chrf([], [])


def test_wer_normalizes_each_language_and_counts_characters_where_words_are_unspaced():
    """Split on spaces, a Chinese or Japanese sentence was one word (WER 1.0 for one wrong character), and the English
    normalizer took other languages' diacritics ("Straße" -> "strasse")."""
    from nemo_speechlm.evaluation.standard import score_asr

    zh = (["我喜欢吃苹果。"], ["我喜欢吃香蕉。"])
    assert word_error_rate(*zh)["wer"] == 1.0  # as before, without a language
    counted = word_error_rate(*zh, languages=["zh-CN"])
    assert (counted["wer"], counted["reference_words"], counted["substitutions"]) == (pytest.approx(2 / 6), 6, 2)
    assert char_error_rate(*zh, languages=["zh"])["cer"] == pytest.approx(2 / 6)
    assert utterance_wer("日本語の文です。", "日本語の文でした。", language="ja") == pytest.approx(2 / 7)
    assert utterance_wer("Straße größer!", "strasse grösser", language="de") == 1.0  # diacritics kept, case folded
    assert utterance_wer("Straße größer!", "straße Größer", language="de") == 0.0
    assert utterance_wer("The cat, Mr. Lee.", "the cat mister lee") == 0.0  # English: Whisper's normalizer as before
    metrics = score_asr(["The cat.", zh[0][0]], ["the dog", zh[1][0]], languages=[None, "zh"])
    assert metrics["wer"] == pytest.approx(3 / 8) and metrics["normalization"].startswith("whisper_english for English")


def test_cer_by_hand():
    # a b c  vs  a b d ␣ e: c->d substituted, "␣" and "e" inserted: 3 edits / 3 characters.
    out = char_error_rate(["abc"], ["abd e"], normalize=False)
    assert (out["cer"], out["substitutions"], out["deletions"], out["insertions"]) == (1.0, 1, 0, 2)
    # "hello world" vs "hello word": one deleted character out of 11 (the space counts).
    assert char_error_rate(["Hello, World!"], ["hello word"])["cer"] == pytest.approx(1 / 11)


# --------------------------------------------------------------------------- BLEU / chrF


def test_bleu_and_chrf_of_identical_text_are_100():
    text = "The cat sat on the mat."
    assert bleu([text], [text]) == pytest.approx(100)
    assert chrf([text], [text]) == pytest.approx(100)
    assert sentence_bleu(text, text) == pytest.approx(100)
    assert sentence_chrf(text, text) == pytest.approx(100)


def test_bleu_brevity_penalty_by_hand():
    # The hypothesis is the reference minus its last word: every n-gram precision is 1
    # (5/5, 4/4, 3/3, 2/2), so BLEU is the brevity penalty exp(1 - 6/5).
    expected = 100 * math.exp(1 - 6 / 5)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the"]) == pytest.approx(expected)
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the") == pytest.approx(expected)
    assert sentence_bleu("the cat sat on the mat", "") == 0.0


def test_bleu_tokenizes_each_target_language_as_published_scores_do():
    """13a sees a Chinese sentence as one word: one different character gave BLEU 0 (sacrebleu's zh tokenizer,
    which published Chinese scores use, 66.1). A corpus may mix languages, each pair tokenized for its own."""
    import sacrebleu

    en = (["The cat sat on the mat.", "Open the window at 5:30 p.m., please."],
          ["The cat sat on a mat.", "Open the window at 5:30, please."])
    zh = (["我喜欢吃苹果和香蕉。", "今天天气很好。"], ["我喜欢吃苹果和橙子。", "今天天气不错。"])
    assert bleu(*en) == pytest.approx(sacrebleu.corpus_bleu(en[1], [en[0]]).score)  # 13a as before
    assert bleu(*zh, "zh") == pytest.approx(sacrebleu.corpus_bleu(zh[1], [zh[0]], tokenize="zh").score)
    assert sentence_bleu(zh[0][0], zh[1][0], "zh") == pytest.approx(66.06, abs=0.01) and sentence_bleu(zh[0][0], zh[1][0]) == 0
    for code in ("zh-CN", "ZH", "zh_TW"):  # by the primary subtag, in any case: these took 13a
        assert sentence_bleu(zh[0][0], zh[1][0], code) == pytest.approx(66.06, abs=0.01)
    by_pair = bleu(en[0] + zh[0], en[1] + zh[1], ["en", "en", "zh", "zh"])
    assert by_pair > bleu(en[0] + zh[0], en[1] + zh[1])  # all 13a: the Chinese pairs count as one word each
    try:  # Japanese takes MeCab (sacrebleu[ja]); without it, an error saying what to install, not a BLEU of ~0
        assert sentence_bleu("日本語の文です。", "日本語の文です。", "ja") == pytest.approx(100)
    except InputError as e:
        assert "sacrebleu[ja]" in str(e)


def test_chrf_by_hand():
    # "abc" vs reference "abd": 1-grams 2 of 3 match, 2-grams 1 of 2, 3-grams 0 of 1; no
    # 4- to 6-grams, so sacrebleu averages precision and recall over these 3 orders:
    # P = R = (2/3 + 1/2 + 0) / 3 = 7/18, and F-beta of equal P and R is 7/18.
    assert sentence_chrf("abd", "abc") == pytest.approx(100 * 7 / 18)
    assert chrf(["abd"], ["abc"]) == pytest.approx(100 * 7 / 18)


# --------------------------------------------------------------------------- ROUGE-L / EM / copies


def test_rouge_l_from_lcs_by_hand():
    # LCS of (the cat sat on the mat) and (the cat on the mat today please) is
    # "the cat on the mat": 5 words. P = 5/7, R = 5/6, F = 2PR/(P+R) = 10/13.
    assert rouge_l("the cat sat on the mat", "the cat on the mat today please") == pytest.approx(10 / 13)
    assert rouge_l("The cat, on the MAT!", "the cat on the mat") == pytest.approx(1.0)  # case, punctuation
    assert rouge_l("Кошка сидит", "кошка сидит") == pytest.approx(1.0)  # non-Latin words are kept
    # Chinese and Japanese characters count one each (a sentence was one token: 0 for one character off)
    assert rouge_l("我喜欢吃苹果和香蕉。", "我喜欢吃苹果和橙子。") == pytest.approx(7 / 9)
    assert rouge_l("カタカナ ok", "カタカナok") == pytest.approx(1.0)
    assert rouge_l("the cat", "") == 0.0


def test_exact_match():
    assert exact_match("Mr. Smith paid twenty dollars.", "mister smith paid $20")
    assert not exact_match("Mr. Smith paid twenty dollars.", "mister smith paid $20", normalize=False)
    assert exact_match(" yes ", "yes", normalize=False)
    assert not exact_match("Yes", "No")


def test_transcript_copy_detection():
    assert is_transcript_copy("The quick brown fox jumps over the lazy dog today.", TRANSCRIPT)
    assert is_transcript_copy("the quick brown fox jumped over the lazy dog today", TRANSCRIPT)  # WER 0.1
    assert not is_transcript_copy("the quick brown fox jumped over the lazy cat today", TRANSCRIPT)  # 0.2
    assert not is_transcript_copy("The audio says: " + TRANSCRIPT, TRANSCRIPT)  # 3 insertions: 0.3
    assert not is_transcript_copy("A fox jumps over a dog.", TRANSCRIPT)
    assert not is_transcript_copy("", TRANSCRIPT)
    assert not is_transcript_copy("anything", "")


# --------------------------------------------------------------------------- task checks


def test_registry_has_the_catalog_names():
    assert set(TASK_CHECKS) == {
        "nonempty", "one_sentence", "short", "keyword_list", "question", "language", "one_of",
        "shorter_than_input", "close_to_input", "differs_from_input", "yes_no",
    }


def test_sentence_splitter():
    assert split_sentences("Dr. Smith arrived at 3.5 p.m.") == ["Dr. Smith arrived at 3.5 p.m."]
    assert split_sentences("He left at 5 p.m. The shop closed") == ["He left at 5 p.m.", "The shop closed"]
    assert split_sentences("I live in the U.S. It is big.") == ["I live in the U.S.", "It is big."]
    assert len(split_sentences("The U.S. economy grew 3.5%. Mr. and Mrs. Smith came.")) == 2
    assert len(split_sentences('"Is it done?" she asked.')) == 1
    assert len(split_sentences("The cat sat... and slept.")) == 1
    assert split_sentences("1. First point. 2. Second point.") == ["1. First point.", "2. Second point."]


FRENCH = "Le chat est assis sur le tapis et il dort."
GERMAN = "Die Katze sitzt auf der Matte und schläft."
SPANISH = "El gato está sentado en la alfombra y duerme."
ENGLISH = "The cat is sitting on the mat and it is asleep."


@pytest.mark.parametrize(
    "spec, answer, expected",
    [
        ("nonempty", "a", True),
        ("nonempty", " \n ", False),
        ("one_sentence", "Dr. Smith arrived at 3.5 p.m.", True),
        ("one_sentence", "It was good, e.g. the food was hot.", True),
        ("one_sentence", "J. K. Rowling wrote it", True),
        ("one_sentence", "The cat sat. The dog ran.", False),
        ("one_sentence", "Wow! Really?", False),
        ("one_sentence", "First line\nSecond line", False),
        ("one_sentence", "", False),
        ("short", "The Cat on the Mat", True),
        ("short", "one two three four five six seven eight nine ten eleven twelve thirteen", False),
        ({"name": "short", "max_words": 3}, "A Big Red Cat", False),
        ("short", "Title\nSubtitle", False),
        ("short", "   ", False),
        ("keyword_list", "cats, dogs, pet care", True),
        ("keyword_list", "- cats\n- dogs\n- pet care", True),
        ("keyword_list", "1. cats\n2. dogs", True),
        ("keyword_list", "Keywords: cats; dogs; pets.", True),
        ("keyword_list", "cats", False),
        ("keyword_list", "The cat sat on the mat and then it went to sleep all day", False),
        ("keyword_list", "cats, the big brown dog outside", False),
        ({"name": "keyword_list", "max_items": 2}, "a, b, c", False),
        ("question", "What did the cat sit on?", True),
        ("question", "Where is it? It is here.", True),
        ("question", "The cat sat on the mat.", False),
        ("question", "Sure. What is it?", False),
        ({"name": "language", "lang": "fr"}, FRENCH, True),
        ({"name": "language", "lang": "fr"}, "Here is the translation: " + FRENCH, True),
        ({"name": "language", "lang": "de"}, FRENCH, False),
        ({"name": "language", "lang": "fr"}, ENGLISH, False),
        ({"name": "language", "lang": "en"}, ENGLISH, True),
        ({"name": "language", "lang": "en"}, FRENCH, False),
        ({"name": "language", "lang": "de"}, GERMAN, True),
        ({"name": "language", "lang": "es"}, SPANISH, True),
        ({"name": "language", "lang": "fr"}, SPANISH, False),
        ({"name": "language", "lang": "fr"}, "Bonjour", False),  # no function words: documented limit
        ({"name": "one_of", "labels": ["positive", "negative", "neutral"]}, "Positive.", True),
        ({"name": "one_of", "labels": ["positive", "negative", "neutral"]}, "The sentiment is NEGATIVE", True),
        ({"name": "one_of", "labels": ["positive", "negative", "neutral"]}, "positive or negative", False),
        ({"name": "one_of", "labels": ["positive", "negative", "neutral"]}, "positively fine", False),
        ({"name": "one_of", "labels": ["sports", "science and technology"]}, "Science  and technology", True),
        ("shorter_than_input", "a fox jumps over a dog", True),
        ("shorter_than_input", TRANSCRIPT + " again", False),
        ({"name": "shorter_than_input", "ratio": 0.3}, "a fox jumps over dogs", False),  # 5 > 3
        ("shorter_than_input", "", False),
        ("close_to_input", "The quick brown fox jumps over the lazy dog, today!", True),
        ("close_to_input", "A summary about animals.", False),
        ("close_to_input", "", False),
        ({"name": "close_to_input", "max_wer": 0.05}, "the quick brown fox jumped over the lazy dog today", False),
        ("differs_from_input", "A fast fox leaps over a sleepy dog.", True),
        ("differs_from_input", "The quick brown fox jumps over the lazy dog today.", False),
        ("differs_from_input", "", False),
        ("yes_no", "Yes.", True),
        ("yes_no", "no, it is not", True),
        ("yes_no", "**No**", True),
        ("yes_no", "Nope", False),
        ("yes_no", "Yesterday it rained", False),
        ("yes_no", "Maybe yes", False),
    ],
)
def test_task_checks(spec, answer, expected):
    assert run_check(spec, answer, TRANSCRIPT) is expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("summarise", "unknown task check 'summarise'"),
        ({"lang": "fr"}, "has no 'name'"),
        ({"name": "short", "maxwords": 3}, "bad parameters"),
        ({"name": "short", "max_words": 0}, "max_words must be an integer >= 1"),
        ({"name": "language", "lang": "it"}, "lang must be one of"),
        ({"name": "one_of", "labels": "positive"}, "labels must be a non-empty list"),
        (3, "a task check spec is a name or a mapping"),
    ],
)
def test_bad_check_specs_name_the_known_checks(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_check(spec)
    assert "known checks: close_to_input, differs_from_input" in str(error.value)
