"""A synthetic speech corpus: sentences spoken by several TTS speakers, with word alignments.

Output (``out_dir``): ``wavs/<utt_id>.wav`` (16-bit PCM) plus ``wavs/<utt_id>.json`` (the
alignment, written after the wav, so it marks a finished utterance), and two NeMo
manifests, ``train_manifest.json`` and ``heldout_manifest.json``. The held-out sentences
are a fixed seeded subset, so no held-out sentence is ever heard in training. A rerun
reuses every finished utterance and rewrites byte-identical manifests.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile
from tqdm import tqdm

from nemo_speechlm.tts.base import SpeechSynthesizer, Synthesis

__all__ = ["load_sentences", "split_heldout", "synthesize_corpus", "synthesize_split"]

log = logging.getLogger(__name__)

# The demo's voices (espeak-ng voice, words per minute): training speakers and the one training never hears.
# Here rather than in the demo so benchmarks build the same corpus and their numbers compare.
DEMO_VOICES = ("en-us", "en-gb", "en-us+m3", "en-us+f3")
DEMO_RATES = (130, 150, 170)
DEMO_UNSEEN_VOICE = ("en-us+m1", 150)

TRAIN_MANIFEST = "train_manifest.json"
HELDOUT_MANIFEST = "heldout_manifest.json"


def load_sentences() -> list[str]:
    """The English sentences shipped with the package (``nemo_speechlm/resources/sentences.txt``)."""
    text = resources.files("nemo_speechlm").joinpath("resources", "sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def split_heldout(num_sentences: int, heldout: int | float, seed: int = 0) -> tuple[list[int], set[int]]:
    """A seeded order of sentence indices and the held-out set (the first ``heldout`` of that order).

    ``heldout`` is a count (int) or a fraction in [0, 1) (float).
    """
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)):
        raise TypeError(f"heldout must be an int count or a float fraction, got {heldout!r}")
    if isinstance(heldout, float):
        if not 0.0 <= heldout < 1.0:
            raise ValueError(f"heldout as a fraction must be in [0, 1), got {heldout}")
        count = round(heldout * num_sentences)
    else:
        count = heldout
    if not 0 <= count < num_sentences:
        raise ValueError(f"heldout={heldout} leaves no training sentences out of {num_sentences}")
    order = list(range(num_sentences))
    random.Random(seed).shuffle(order)
    return order, set(order[:count])


def _check_inputs(sentences: Sequence[str], speakers: Sequence[SpeechSynthesizer]) -> None:
    if not sentences:
        raise ValueError("synthesize_corpus got no sentences")
    seen: dict[str, int] = {}
    for i, s in enumerate(sentences):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"sentence {i} is empty or not a string: {s!r}")
        key = " ".join(s.split())
        if key in seen:  # a duplicate could land on both sides of the held-out split
            raise ValueError(f"sentence {i} duplicates sentence {seen[key]}: {s!r}")
        seen[key] = i
    if not speakers:
        raise ValueError("synthesize_corpus needs at least one speaker")
    names = [getattr(s, "speaker", None) for s in speakers]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"speakers need distinct, non-empty .speaker names, got {names}")


def _utt_id(index: int, sentence: str, speaker: str, sample_rate: int) -> str:
    """Index for readability, hash of everything that shapes the audio for safe reuse."""
    digest = hashlib.sha1(f"{speaker}\n{sample_rate}\n{sentence}".encode()).hexdigest()[:10]
    return f"utt{index:05d}-{digest}"


def _load_finished(wav: Path, sidecar: Path, expected: dict) -> dict | None:
    """The stored record of a finished utterance, or None if anything about it is off."""
    if not (wav.is_file() and sidecar.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        info = soundfile.info(str(wav))
    except (OSError, ValueError, RuntimeError, soundfile.LibsndfileError):
        return None
    if any(record.get(k) != v for k, v in expected.items()):
        return None
    if info.samplerate != expected["sample_rate"] or info.frames != record.get("num_samples") or info.frames == 0:
        return None
    return record


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _synthesize_one(tts: SpeechSynthesizer, sentence: str, sample_rate: int) -> Synthesis:
    syn = tts.synthesize(sentence)
    if syn.sample_rate != sample_rate:  # alignments are in seconds: only the audio changes
        import soxr

        syn.audio = soxr.resample(syn.audio, syn.sample_rate, sample_rate).astype(np.float32)
        syn.sample_rate = sample_rate
    return syn


def synthesize_corpus(
    sentences: Sequence[str],
    out_dir: str | Path,
    speakers: Sequence[SpeechSynthesizer],
    heldout: int | float,
    seed: int = 0,
    sample_rate: int = 16000,
) -> tuple[Path, Path]:
    """Speak every sentence once (speaker picked round-robin over a seeded order); write manifests.

    Returns ``(train_manifest, heldout_manifest)``. Manifest lines: ``audio_filepath``
    (absolute), ``duration``, ``text`` (the normalized text actually spoken), ``words``
    (``[{word, start, end}]`` in seconds), ``speaker``, ``utt_id``.
    """
    _check_inputs(sentences, speakers)
    out_dir = Path(out_dir).resolve()
    order, heldout_ids = split_heldout(len(sentences), heldout, seed)
    speaker_of = {idx: speakers[rank % len(speakers)] for rank, idx in enumerate(order)}
    records = _synthesize_all([(i, s, speaker_of[i]) for i, s in enumerate(sentences)], out_dir / "wavs", sample_rate)
    train_path, heldout_path = out_dir / TRAIN_MANIFEST, out_dir / HELDOUT_MANIFEST
    for path, keep in ((train_path, lambda i: i not in heldout_ids), (heldout_path, lambda i: i in heldout_ids)):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for i, r in enumerate(records) if keep(i))
        _write_atomic(path, lambda p: p.write_text(lines, encoding="utf-8"))
    log.info("synthesize_corpus: %d train / %d held-out -> %s", len(records) - len(heldout_ids), len(heldout_ids), out_dir)
    return train_path, heldout_path


def synthesize_split(
    train: Sequence[str],
    heldout: Sequence[str],
    out_dir: str | Path,
    speakers: Sequence[SpeechSynthesizer],
    unseen_speaker: SpeechSynthesizer,
    sample_rate: int = 16000,
) -> dict[str, Path]:
    """Speak a given train / held-out split: both with ``speakers`` (round-robin), and the held-out
    sentences once more with ``unseen_speaker``, a voice training never hears.

    Returns the manifests ``{"train", "heldout", "heldout_unseen_voice"}`` (written as in
    :func:`synthesize_corpus`; a rerun reuses every finished utterance).
    """
    _check_inputs(list(train) + list(heldout), list(speakers) + [unseen_speaker])
    out_dir = Path(out_dir).resolve()
    n_train = len(train)
    jobs = [(i, s, speakers[i % len(speakers)]) for i, s in enumerate(list(train) + list(heldout))]
    jobs += [(len(jobs) + i, s, unseen_speaker) for i, s in enumerate(heldout)]
    records = _synthesize_all(jobs, out_dir / "wavs", sample_rate)
    parts = {"train": records[:n_train], "heldout": records[n_train : n_train + len(heldout)],
             "heldout_unseen_voice": records[n_train + len(heldout) :]}
    paths = {}
    for name, part in parts.items():
        paths[name] = out_dir / f"{name}_manifest.json"
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        _write_atomic(paths[name], lambda p: p.write_text(lines, encoding="utf-8"))
    return paths


def _synthesize_all(jobs: list[tuple[int, str, SpeechSynthesizer]], wav_dir: Path, sample_rate: int) -> list[dict]:
    """Speak ``(index, sentence, speaker)`` jobs into ``wav_dir``, reusing finished utterances; manifest records."""
    wav_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    reused, audio_s = 0, 0.0
    start = time.perf_counter()
    bar = tqdm(jobs, desc="synthesize", unit="utt")
    for i, sentence, tts in bar:
        sentence = " ".join(sentence.split())
        utt_id = _utt_id(i, sentence, tts.speaker, sample_rate)
        wav, sidecar = wav_dir / f"{utt_id}.wav", wav_dir / f"{utt_id}.json"
        expected = {"utt_id": utt_id, "source_text": sentence, "speaker": tts.speaker, "sample_rate": sample_rate}
        record = _load_finished(wav, sidecar, expected)
        if record is None:
            syn = _synthesize_one(tts, sentence, sample_rate)
            audio = np.clip(syn.audio, -1.0, 1.0)
            _write_atomic(wav, lambda p: soundfile.write(str(p), audio, sample_rate, subtype="PCM_16", format="WAV"))
            record = {**expected, "text": syn.text, "words": syn.words, "num_samples": int(len(audio))}
            _write_atomic(sidecar, lambda p: p.write_text(json.dumps(record) + "\n", encoding="utf-8"))
            audio_s += len(audio) / sample_rate
        else:
            reused += 1
        records.append({
            "audio_filepath": str(wav),
            "duration": round(record["num_samples"] / sample_rate, 4),
            "text": record["text"],
            "words": record["words"],
            "speaker": record["speaker"],
            "utt_id": utt_id,
        })
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(reused=reused, audio_s_per_s=f"{audio_s / elapsed:.0f}", refresh=False)
    bar.close()
    log.info("synthesized %d utterances (%d reused) in %s", len(records), reused, wav_dir)
    return records
