"""How fast does a connector learn to hear? Held-out "repeat" WER and training loss against steps.

Every option trains the same frozen encoder + frozen LLM on the same data (the same cached encoder
features, batches and seed) and differs only in its connector settings; each is evaluated on the
same held-out speech every ``--eval-every`` steps (greedy decoding through the LLM, as in use).

    python benchmarks/convergence.py [--out convergence_out] [--utterances 4800] [--steps 100] \
        [--eval-every 50] [--options baseline,rms,default] [hydra overrides of nemo_speechlm/conf/mtbi.yaml ...]

Options (add your own to OPTIONS):
  baseline  the first MTBI connector: stack 4 + MLP, output unconstrained, no pre-alignment
  rms       + RMSNorm on the output, initialised to the LLM's embedding RMS (Ultravox)
  mlp_ctc   + 600 CTC pre-alignment steps onto the LLM's embeddings (the MLP connector's best setting)
  default   today's mtbi.yaml: + bidirectional GRU, SpecAugment, 2000 CTC steps and the CTC read-out

The corpus is the demo's (the shipped request grammar spoken by espeak-ng; reused from ``--out``), or
``--manifest``/``--heldout-manifest``. Writes ``results.json``, ``results.md`` and ``curves.png``.
The training loop is the recipe's step (``model.compute_losses``, its optimizer and scheduler, clip 1.0)
without Lightning, so evaluation can run between steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nemo_speechlm
from nemo_speechlm.data.datamodule import build_datamodule, fill_model_settings
from nemo_speechlm.data.feature_cache import prepare_feature_cache
from nemo_speechlm.data.manifest import read_manifest
from nemo_speechlm.inference import load_entry_audio
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.metrics import word_error_rate
from nemo_speechlm.recipe import pre_align_connector

REPEAT_PROMPT = "Repeat exactly what is said: <|audio|>"
BASELINE = ["model.perception.modality_adapter.output_rms=null", "model.perception.modality_adapter.context_kernel=1",
            "connector_pretraining.steps=0", "model.perception.modality_adapter.rnn_layers=0",
            "model.perception.modality_adapter.spec_augment=null", "model.ctc_readout=false"]
OPTIONS = {
    "baseline": BASELINE,
    "rms": ["model.perception.modality_adapter.output_rms=auto", *BASELINE[1:]],
    "mlp_ctc": ["model.perception.modality_adapter.output_rms=auto", "connector_pretraining.steps=600",
                "connector_pretraining.lr=2e-3", *BASELINE[3:]],
    "default": [],
}


def corpus(out: Path, utterances: int, heldout: int) -> tuple[Path, Path]:
    from nemo_speechlm.tts import EspeakTTS, speakers
    from nemo_speechlm.tts.corpus import DEMO_RATES, DEMO_UNSEEN_VOICE, DEMO_VOICES, synthesize_split
    from nemo_speechlm.tts.grammar import RequestGrammar

    split = RequestGrammar.load().split(utterances, heldout)  # the demo's corpus, so the numbers compare
    paths = synthesize_split(split.train, split.heldout, out / "corpus", speakers(DEMO_VOICES, DEMO_RATES),
                             EspeakTTS(*DEMO_UNSEEN_VOICE))
    return paths["train"], paths["heldout"]


def build(option: list[str], args, train_manifest: Path):
    overrides = [
        "model.target=nemo_speechlm.models.SpeechLMModel", "trainer.accelerator=cpu", f"trainer.max_steps={args.steps}",
        "model.lr_scheduler.warmup_steps=10", f"feature_cache.dir={args.features or args.out / 'features'}",
        "model.perception.encoder.pad_to_window=false", *option, *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("mtbi", overrides=overrides)
    # The repeat task on every utterance (plain speech SFT data), so every option learns the same thing.
    cfg.data.train_ds.input_cfg = [{"type": "speechlm_manifest", "manifest_filepath": str(train_manifest),
                                    "prompt": REPEAT_PROMPT, "answer_field": "text"}]
    OmegaConf.resolve(cfg.data)
    torch.manual_seed(cfg.seed)
    model = SpeechLMModel(cfg.model)
    fill_model_settings(cfg.data, model)
    cache = prepare_feature_cache(cfg.feature_cache, model, cfg.data)
    return cfg, model, cache


def heldout_wer(model, entries, audio) -> tuple[float, list[str]]:
    model.eval()
    answers = model.respond(audio, [REPEAT_PROMPT] * len(audio), batch_size=20, max_new_tokens=40)
    model.train()
    return word_error_rate([e["text"] for e in entries], answers)["wer"], answers


def run_option(name: str, option: list[str], args, train_manifest: Path, entries, audio) -> dict:
    cfg, model, cache = build(option, args, train_manifest)
    start = time.time()
    pre_align_connector(cfg.get("connector_pretraining"), model, cfg.data, cache, resuming=False)
    pre_seconds = time.time() - start
    loader = build_datamodule(cfg.data, model, cache).train_dataloader()
    opt = model.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    curve = {"step": [], "wer": [], "loss": []}
    wer, answers = heldout_wer(model, entries, audio)
    curve["step"].append(0), curve["wer"].append(wer), curve["loss"].append(None)
    print(f"[{name}] step 0 held-out WER {wer:.1%}", flush=True)
    losses, batches, train_start = [], iter(loader), time.time()
    for step in range(1, args.steps + 1):
        model.train()
        for module in (model.perception.preprocessor, model.perception.encoder, model.llm):
            module.eval()
        loss = model.compute_losses(next(batches))["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % args.eval_every == 0:
            wer, answers = heldout_wer(model, entries, audio)
            recent = losses[-args.eval_every:]
            curve["step"].append(step), curve["wer"].append(wer), curve["loss"].append(sum(recent) / len(recent))
            print(f"[{name}] step {step} loss {curve['loss'][-1]:.3f} held-out WER {wer:.1%} "
                  f"(e.g. {entries[0]['text']!r} -> {answers[0]!r})", flush=True)
    return {"overrides": option, "pre_alignment_seconds": round(pre_seconds, 1),
            "seconds_per_step": round((time.time() - train_start) / args.steps, 2), **curve,
            "examples": [{"reference": e["text"], "answer": a} for e, a in list(zip(entries, answers))[:5]]}


def write_reports(results: dict, args, out: Path) -> None:
    header = (f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; {args.steps} steps of batch 8 through the LLM")
    steps = results[next(iter(results))]["step"]
    lines = [header, "", "| option | " + " | ".join(f"WER @ {s}" for s in steps) + " | pre-alignment s | s/step |",
             "|---|" + "---:|" * (len(steps) + 2)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{w:.1%}" for w in r["wer"]) +
                     f" | {r['pre_alignment_seconds']} | {r['seconds_per_step']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "results": results}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        ax1.plot(r["step"], [100 * w for w in r["wer"]], marker="o", label=name)
        ax2.plot(r["step"][1:], r["loss"][1:], marker="o", label=name)
    ax1.set(xlabel="steps through the LLM", ylabel="held-out repeat WER (%)")
    ax2.set(xlabel="steps through the LLM", ylabel="training loss")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("convergence_out"))
    p.add_argument("--utterances", type=int, default=4800)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--heldout-manifest", type=Path, default=None)
    p.add_argument("--features", type=Path, default=None, help="feature cache directory (default: OUT/features; "
                   "demo_out/features reuses the demo's)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of {', '.join(OPTIONS)}")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.manifest:
        train_manifest, heldout_manifest = args.manifest, args.heldout_manifest
    else:
        train_manifest, heldout_manifest = corpus(args.out, args.utterances, args.heldout)
    entries = list(read_manifest(heldout_manifest))
    audio = [load_entry_audio(e, 16000) for e in entries]
    results = {}
    for name in args.options.split(","):
        results[name] = run_option(name, OPTIONS[name], args, train_manifest, entries, audio)
        write_reports(results, args, args.out)


if __name__ == "__main__":
    main()
