"""`examples/compare_objectives.py` at a reduced size: every condition trains and is evaluated, a rerun resumes.

Tiny random models (the tests' Llama and Whisper), 8 training utterances, a few steps, one seed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from nemo_speechlm.data.task_catalog import EVALUATION_SPLITS, TaskCatalog
from nemo_speechlm.datagen.behaviors import behavior_items
from tests.tiny_assets import make_tiny_whisper, make_wav_manifest
from tests.conftest import REPO

pytestmark = pytest.mark.slow
CONDITIONS = ("asr_only", "single_task", "mtbi_ce", "mtbi_interleave", "mtbi_interleave_kl", "joint_sft", "joint_sft_text")


def _words(text: str, duration: float) -> list[dict]:
    tokens = text.split()
    step = duration / len(tokens)
    return [{"word": w, "start": round(i * step, 3), "end": round((i + 0.8) * step, 3)} for i, w in enumerate(tokens)]


def _data_dir(assets, root):
    """A demo-like folder: corpus/{train,heldout}_manifest.json and behaviors.jsonl (repeat + other tasks)."""
    corpus = root / "data" / "corpus"
    corpus.mkdir(parents=True)
    catalog = TaskCatalog.load()
    train = []
    for line in open(assets["manifest"]):
        entry = json.loads(line)
        train.append({**entry, "words": _words(entry["text"], entry["duration"])})
    (corpus / "train_manifest.json").write_text("".join(json.dumps(e) + "\n" for e in train))
    # held-out audio paths relative to the manifest's folder (NeMo's convention), as a user's corpus may have them
    heldout = [json.loads(line) for line in make_wav_manifest(corpus / "heldout", n=2, seed=1).read_text().splitlines()]
    (corpus / "heldout_manifest.json").write_text("".join(
        json.dumps({**e, "audio_filepath": os.path.relpath(e["audio_filepath"], corpus)}) + "\n" for e in heldout))
    prompts = catalog.training_prompts()
    rows = []
    for i, entry in enumerate(train):
        for prompt in (catalog.task("repeat").prompts_in("train")[0], prompts[(7 * i) % len(prompts)]):
            response = entry["text"] if prompt.task == "repeat" else f"it says {entry['text']}"
            rows.append({**entry, "key": f"{i}|{prompt.id}", "task": prompt.task, "prompt": prompt.text,
                         "prompt_id": prompt.id, "response": response, "split": "train"})
    (root / "data" / "behaviors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data"


def _continue_behaviors(out):
    """The teacher's "continue" answers, written ahead (a tiny random LLM's answers are rejected as degenerate)."""
    catalog = TaskCatalog.load().select(["continue"])
    rows = [{**item["entry"].data, "key": item["key"], "task": "continue", "prompt": item["prompt"].text,
             "prompt_id": item["prompt"].id, "response": "and then it went on", "split": "train"}
            for item in behavior_items(out / "data" / "utterances.json", catalog, 1, 1)]
    (out / "data" / "behaviors_continue.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_condition_is_trained_evaluated_and_a_rerun_resumes(assets, tmp_path):
    whisper = make_tiny_whisper(tmp_path / "whisper")
    data_dir = _data_dir(assets, tmp_path)
    out = tmp_path / "compare"
    # the utterances file the script derives from behaviors.jsonl, so the continue behaviors can be written first
    (out / "data").mkdir(parents=True)
    seen, utts = set(), []
    for line in (data_dir / "behaviors.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["audio_filepath"] not in seen:
            seen.add(row["audio_filepath"])
            utts.append({k: v for k, v in row.items() if k not in ("key", "task", "prompt", "prompt_id", "response", "split")})
    (out / "data" / "utterances.json").write_text("".join(json.dumps(u) + "\n" for u in utts))
    _continue_behaviors(out)
    cmd = [sys.executable, str(REPO / "examples" / "compare_objectives.py"), "--out", str(out), "--data-dir", str(data_dir),
           "--steps", "2", "--seeds", "1", "--benchmark-utterances", "1", "--eval-utterances", "2", "--max-new-tokens", "4",
           "--batch-size", "4",
           "encoder=whisper", f"model.perception.encoder.pretrained_model={whisper}", "model.perception.encoder.d_model=32",
           "llm=hf", f"model.pretrained_llm={assets['llm']}", "model.perception.modality_adapter.hidden_dim=64",
           "connector_pretraining.steps=5", "data.train_ds.batch_size=4", "trainer.accelerator=cpu"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == set(CONDITIONS)
    for name in CONDITIONS:
        metrics = results["conditions"][name]["metrics"]
        keys = [f"{s}.{m}" for s in EVALUATION_SPLITS for m in ("rouge_l", "follows_task")]
        for key in keys + ["repeat_wer", "zero_audio_wer", "text_retention_rouge_l"]:
            assert metrics[key]["mean"] is not None and math.isfinite(metrics[key]["mean"]), (name, key)
        assert (out / "seed0" / f"{name}.nemo").is_file()
    assert (out / "results.md").read_text().count("| mtbi_interleave_kl |") == 2
    # every named comparison, item by item on the benchmark, per split (one utterance: no interval)
    assert len(results["paired"]) == 7 and all(set(pair["splits"]) == set(EVALUATION_SPLITS) for pair in results["paired"])
    rows = [row for pair in results["paired"] for row in pair["splits"].values()]
    assert all(row["count"] > 0 and row["rouge_l"] is not None and row["rouge_l_ci"] is None for row in rows)
    assert "| mtbi_interleave_kl − mtbi_interleave | " in (out / "results.md").read_text()
    assert all(pair["seeds"] == {"0": pair["splits"]} for pair in results["paired"])  # one seed: pooled = that seed
    assert "seed by seed" not in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    assert "estimate: ~" in first.stdout
    assert "Connector loaded from" in first.stdout + first.stderr  # every condition starts from the seed's stage 1

    # A rerun with a larger benchmark: nothing retrained, the first utterance's answers kept, the second's made
    predictions = out / "seed0" / "benchmark" / "predictions.jsonl"
    answered = predictions.read_text().splitlines()
    larger = [*cmd[2:cmd.index("--benchmark-utterances") + 1], "2", *cmd[cmd.index("--benchmark-utterances") + 2:]]
    second = subprocess.run([cmd[0], cmd[1], *larger], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    log = second.stdout + second.stderr
    assert "reusing the aligned connector" in log
    assert all(f"{name}: reusing" in log for name in CONDITIONS)
    assert "Connector loaded from" not in log and "`max_steps=2` reached" not in log  # nothing retrained
    now = predictions.read_text().splitlines()
    assert now[:len(answered)] == answered and len(now) == 2 * len(answered)
    rerun = json.loads((out / "results.json").read_text())
    assert all(row["count"] == 2 * first_row["count"] for pair, first_pair in zip(rerun["paired"], results["paired"])
               for row, first_row in zip(pair["splits"].values(), first_pair["splits"].values()))
    assert all(m["evaluation"]["benchmark_utterances"] == 2 for m in rerun["per_seed"]["0"].values())

    # Other steps into the same --out: refused at the start, where the 2-step models used to be reused as 3-step ones
    # (in this process: the refusal comes before any training, and a subprocess would spend its time on imports).
    import importlib.util

    from nemo_speechlm.errors import InputError

    spec = importlib.util.spec_from_file_location("compare_objectives_script", cmd[1])
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    # settings.json as written before an upgrade added a config key: at its default it is no change (only the steps are)
    recorded = json.loads((out / "settings.json").read_text())
    del recorded["config"]["trainer"]["gradient_clip_val"]
    (out / "settings.json").write_text(json.dumps(recorded))
    more_steps = [*cmd[2:cmd.index("--steps") + 1], "3", *cmd[cmd.index("--steps") + 2:]]
    with pytest.raises(InputError, match=r"holds results made with other settings \(config\.trainer\.max_steps: 2 -> 3\)"):
        script.main(more_steps)

    # With two seeds, results.md shows each comparison on each seed's models too
    two = {**results, "paired": [{**pair, "seeds": {"0": pair["splits"], "1": pair["splits"]}} for pair in results["paired"]]}
    script.write_report(tmp_path, two, {**results["run"], "seeds": [0, 1]})
    report = (tmp_path / "results.md").read_text().split("## The same differences, seed by seed")[1]
    assert report.count("| mtbi_interleave_kl − mtbi_interleave | 0 | ") == 1
    assert report.count("| mtbi_interleave_kl − mtbi_interleave | 1 | ") == 1
