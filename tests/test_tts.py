"""Real espeak-ng synthesis: audio, word alignments, normalization, shipped sentences, corpus."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from nemo_speechlm.tts import (
    EspeakTTS,
    SpeechSynthesizer,
    available_voices,
    load_sentences,
    normalize_for_tts,
    speakers,
    synthesize_corpus,
)

TEXT = "The quick brown fox jumps over the lazy dog, and then it sleeps in the sun."


@pytest.fixture(scope="module")
def tts():
    return EspeakTTS("en-us", rate=175, sample_rate=16000)


@pytest.fixture(scope="module")
def synthesis(tts):
    return tts.synthesize(TEXT)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def median_f0(syn) -> float:
    import librosa

    f0 = librosa.yin(syn.audio, fmin=60, fmax=400, sr=syn.sample_rate)
    return float(np.median(f0))


def test_audio_is_16k_float_and_not_empty(tts, synthesis):
    assert isinstance(tts, SpeechSynthesizer)
    assert synthesis.sample_rate == 16000 and synthesis.audio.dtype == np.float32 and synthesis.audio.ndim == 1
    assert 2.0 < synthesis.duration < 10.0
    assert np.abs(synthesis.audio).max() > 0.1
    assert synthesis.text == TEXT and synthesis.speaker == "en-us@175"


def test_word_alignments_are_ordered_one_per_word(synthesis):
    words = synthesis.words
    assert [w["word"] for w in words] == TEXT.split()
    prev_end = 0.0
    for w in words:
        assert prev_end <= w["start"] < w["end"] <= synthesis.duration, w
        prev_end = w["end"]
    assert words[-1]["end"] > synthesis.duration - 0.2  # trailing silence trimmed, last word reaches the end


def test_aligned_words_are_voiced_and_gaps_silent(synthesis):
    audio, sr, words = synthesis.audio, synthesis.sample_rate, synthesis.words
    level = rms(audio)
    for w in words:
        assert rms(audio[int(w["start"] * sr): int(w["end"] * sr)]) > 0.3 * level, w
    comma = next(i for i, w in enumerate(words) if w["word"].endswith(","))
    pause = audio[int(words[comma]["end"] * sr): int(words[comma + 1]["start"] * sr)]
    assert len(pause) > 0.05 * sr, "the comma should leave a pause outside both words"
    assert rms(pause) < 0.05 * level


def test_voices_and_rates_differ_and_engine_state_is_per_object(tts, synthesis):
    fast, female = EspeakTTS("en-us", rate=240), EspeakTTS("en-us+f3", rate=175)
    british = EspeakTTS("en-gb-x-rp", rate=175)
    a_fast, a_female, a_british = (t.synthesize(TEXT) for t in (fast, female, british))
    # the global engine switched voice and rate in between; this speaker must be unaffected
    # (espeak carries its waveform phase from call to call, so compare timing and pitch)
    again = tts.synthesize(TEXT)
    assert abs(again.duration - synthesis.duration) < 0.02 * synthesis.duration
    assert all(abs(a["start"] - b["start"]) < 0.03 for a, b in zip(again.words, synthesis.words))
    assert abs(median_f0(again) - median_f0(synthesis)) < 10
    assert median_f0(a_female) > 1.5 * median_f0(synthesis)  # the f3 variant is a higher voice
    assert a_fast.duration < 0.85 * synthesis.duration
    n = min(len(a_british.audio), len(synthesis.audio))
    assert not np.allclose(a_british.audio[:n], synthesis.audio[:n], atol=1e-3)


def test_the_same_calls_give_the_same_samples_whoever_else_draws_random_numbers(tmp_path):
    """espeak's noise comes from libc's rand(), which anything in the process may draw from (unseeded, a
    quarter of the demo's clips differed between two runs of the demo): each call seeds it."""
    code = ("import ctypes, ctypes.util, sys, numpy as np; from nemo_speechlm.tts import EspeakTTS\n"
            "EspeakTTS('en-gb', rate=130).synthesize('Something else first.')\n"
            "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
            "[libc.rand() for _ in range(int(sys.argv[2]))]\n"
            "np.save(sys.argv[1], EspeakTTS('en-us+f3', rate=150).synthesize(sys.argv[3]).audio)\n")
    for draws in (0, 1000):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{draws}.npy"), str(draws), TEXT], check=True)
    assert np.array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1000.npy"))


def test_threads_share_the_engine_safely():
    from concurrent.futures import ThreadPoolExecutor

    low, high = EspeakTTS("en-us"), EspeakTTS("en-us+f3")
    jobs = [low, high] * 3
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: t.synthesize(TEXT), jobs))
    for tts, out in zip(jobs, results):
        assert out.speaker == tts.speaker and [w["word"] for w in out.words] == TEXT.split()
        assert (median_f0(out) > 150) == (tts is high)


def test_normalizes_before_speaking(tts):
    out = tts.synthesize("Dr. Lee paid $5 on the 21st.")
    assert out.text == "Doctor Lee paid five dollars on the twenty-first."
    assert [w["word"] for w in out.words] == out.text.split()


def test_clear_errors():
    with pytest.raises(ValueError, match=r"unknown espeak voice 'xx-nowhere'.*en-us"):
        EspeakTTS("xx-nowhere")
    with pytest.raises(ValueError, match=r"unknown espeak variant 'nobody'"):
        EspeakTTS("en-us+nobody")
    with pytest.raises(ValueError, match=r"rate must be"):
        EspeakTTS("en-us", rate=5)
    for empty in ("", "   ", "?!"):
        with pytest.raises(ValueError, match="no speakable text"):
            EspeakTTS().synthesize(empty)


def test_speakers_are_distinct_and_available():
    langs, variants = available_voices()
    assert {"en-us", "en-gb", "en-gb-x-rp"} <= set(langs) and {"f3", "m3"} <= set(variants)
    names = [s.speaker for s in speakers()]
    assert len(names) == len(set(names)) >= 12


NORMALIZER_CASES = [
    ("I paid $5 for 2 coffees.", "I paid five dollars for two coffees."),
    ("It costs £3.50 today.", "It costs three pounds and fifty pence today."),
    ("Only $1 or $0.99!", "Only one dollar or ninety-nine cents!"),
    ("A $2.5 million deal", "A two point five million dollars deal"),
    ("The 21st century began in 2001.", "The twenty-first century began in two thousand and one."),
    ("She was born in 1999.", "She was born in nineteen ninety-nine."),
    ("We sold 1500 copies.", "We sold one thousand five hundred copies."),
    ("It has 1,234,567.", "It has one million two hundred and thirty-four thousand five hundred and sixty-seven."),
    ("Pi is about 3.14.", "Pi is about three point one four."),
    ("Growth hit 7.5%, up from 5 %.", "Growth hit seven point five percent, up from five percent."),
    ("Meet me at 3:30 pm or 10:05.", "Meet me at three thirty p.m. or ten oh five."),
    ("It is 4:00 now.", "It is four o'clock now."),
    ("The train leaves at 7am.", "The train leaves at seven a.m."),
    ("Dr. Li met Mr. and Mrs. Jones on Main St. today.", "Doctor Li met Mister and Missus Jones on Main Street today."),
    ("St. Patrick's Day", "Saint Patrick's Day"),
    ("Fruit, e.g. apples, pears, etc. Then rest.", "Fruit, for example apples, pears, et cetera. Then rest."),
    ("That is, i.e. never.", "That is, that is never."),
    ("Cats vs. dogs", "Cats versus dogs"),
    ("Salt & pepper", "Salt and pepper"),
    ("2 + 2 = 4", "two plus two equals four"),
    ("The 1990s and the 80s", "The nineteen nineties and the eighties"),
    ("It was 25°C outside.", "It was twenty-five degrees Celsius outside."),
    ("He ran 5 km.", "He ran five kilometers."),
    ("Add 1/2 cup and 3/4 of the flour.", "Add a half cup and three quarters of the flour."),
    ("It fell to -5 degrees.", "It fell to minus five degrees."),
    ("It is -5°C, and -3 km down.",  # the minus was dropped before °C and units
     "It is minus five degrees Celsius, and minus three kilometers down."),
    ("Room #4 and No. 10", "Room number four and number ten"),
    ("Wait - what?", "Wait, what?"),
    ('He said "hello" (quietly).', "He said hello quietly."),
    ("It\u2019s a \u201cnice\u201d day\u2014really.", "It's a nice day, really."),
    ("Call 555-1234.", "Call five five five, one two three four."),
    ("Agent 007 won 3-2.", "Agent zero zero seven won three to two."),
    ("No digits here, just words!", "No digits here, just words!"),
    ("Is it good ——?", "Is it good?"),  # one pass left "good,?" (and a mixed-modal line so made was redone every run)
    ("The bill was $5 -- — .", "The bill was five dollars."),
]


@pytest.mark.parametrize("written,spoken", NORMALIZER_CASES)
def test_normalize_for_tts(written, spoken):
    assert normalize_for_tts(written) == spoken
    # idempotent: the TTS normalizes the planned text again (a mixed-modal line's spoken text is checked against it)
    assert normalize_for_tts(spoken) == spoken


def test_shipped_sentences():
    sentences = load_sentences()
    assert len(sentences) >= 500
    assert len({s.lower() for s in sentences}) == len(sentences), "duplicate sentences"
    for s in sentences:
        assert s.isascii() and not re.search(r"\d", s), s
        assert 6 <= len(s.split()) <= 20, s
        assert s[-1] in ".!?", s
        assert normalize_for_tts(s) == s, f"normalizer changes a shipped sentence: {s}"
    assert sum(s.endswith("?") for s in sentences) >= 20 and sum(s.endswith("!") for s in sentences) >= 20


def read_manifest(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_synthesize_corpus_is_valid_disjoint_and_resumable(tmp_path):
    sentences = load_sentences()[:12]
    voices = speakers(["en-us", "en-gb+f2"], [150, 200])
    train, heldout = synthesize_corpus(sentences, tmp_path / "corpus", voices, heldout=3, seed=1)
    train_rows, heldout_rows = read_manifest(train), read_manifest(heldout)
    assert len(train_rows) == 9 and len(heldout_rows) == 3
    assert not {r["text"] for r in train_rows} & {r["text"] for r in heldout_rows}
    assert sorted(r["text"] for r in train_rows + heldout_rows) == sorted(sentences)
    assert {r["speaker"] for r in train_rows + heldout_rows} == {v.speaker for v in voices}
    for r in train_rows + heldout_rows:
        info = soundfile.info(r["audio_filepath"])
        assert info.samplerate == 16000 and abs(info.frames / 16000 - r["duration"]) < 0.01
        assert [w["word"] for w in r["words"]] == r["text"].split()
        assert 0 <= r["words"][0]["start"] and r["words"][-1]["end"] <= r["duration"]

    # a rerun reuses every wav and writes the same manifests
    mtimes = {r["audio_filepath"]: os.stat(r["audio_filepath"]).st_mtime_ns for r in train_rows + heldout_rows}
    before = train.read_bytes(), heldout.read_bytes()
    again = synthesize_corpus(sentences, tmp_path / "corpus", voices, heldout=3, seed=1)
    assert (again[0].read_bytes(), again[1].read_bytes()) == before
    assert all(os.stat(p).st_mtime_ns == t for p, t in mtimes.items())

    # a broken wav is redone, the rest is kept
    broken = train_rows[0]["audio_filepath"]
    open(broken, "wb").close()
    synthesize_corpus(sentences, tmp_path / "corpus", voices, heldout=3, seed=1)
    assert soundfile.info(broken).frames > 0
    assert all(os.stat(p).st_mtime_ns == t for p, t in mtimes.items() if p != broken)
    assert [r["utt_id"] for r in read_manifest(train)] == [r["utt_id"] for r in train_rows]


def test_synthesize_corpus_rejects_bad_input(tmp_path):
    voices = speakers(["en-us"], [175])
    with pytest.raises(ValueError, match="duplicates sentence 0"):
        synthesize_corpus(["One two three four five six.", "One two three four five six."], tmp_path, voices, heldout=0)
    with pytest.raises(ValueError, match="leaves no training sentences"):
        synthesize_corpus(["One two three four five six."], tmp_path, voices, heldout=1)
