"""Training throughput of a ``SpeechLMModel`` config, optionally against NeMo's own SALM.

    python benchmarks/train_throughput.py [--config-name speechlm] [--steps 20] [--warmup 3]
        [--device cuda|cpu] [--tiny] [--vs-salm] [--cache] [hydra overrides ...]

Batches are fetched from the train dataloader before timing (loading is not timed, the copy to
the device is). A step is forward + backward + optimizer step. Last line: ``RESULT {json}``; with
``--vs-salm``/``--cache`` a first one holds our own numbers, so they survive a comparison run that fails.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor.parallel import loss_parallel

import nemo_speechlm  # noqa: F401  (resolvers, data types, target allow-list)
from mfu import gpu_peak_tflops, mfu_of_result
from nemo.collections.speechlm2 import SALM
from nemo.collections.speechlm2.parts.optim_setup import is_frozen
from nemo_speechlm.data.datamodule import build_datamodule
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.models.speechlm_model import IGNORE_INDEX
from nemo_speechlm.parts.llm import resolve_llm_source
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.tiny_assets
from tests.tiny_assets import make_tiny_llm, make_wav_manifest  # noqa: E402

CONF_DIR = nemo_speechlm.CONF_DIR
Batch = dict
LossFn = Callable[[Batch], torch.Tensor]
MAX_DRAWS_PER_BATCH = 20
LOSS_TOLERANCE = 1e-4  # same weights, same inputs: the two losses must agree this closely before any timing
SPAN_REASON = ("SALM encodes each audio locator's audio on its own, while ours encodes an utterance once and slices "
               "the encoder output for each interleaved speech span, so a span cut from an utterance sees different "
               "encoder context in the two models.")


def parse_args() -> argparse.Namespace:
    """CLI flags; positional arguments are Hydra overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="speechlm")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="build tiny offline assets (CPU smoke benchmark)")
    p.add_argument("--vs-salm", action="store_true", help="also time nemo.collections.speechlm2.SALM")
    p.add_argument("--cache", action="store_true", help="also time the same batches read from the frozen-encoder "
                   "feature cache (freezes the encoder)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (default: the GPU's "
                   "dense bf16 peak by name, benchmarks/mfu.py)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. encoder=canary_1b_flash")
    args = p.parse_intermixed_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def tiny_overrides(root: Path, user_overrides: list[str]) -> list[str]:
    """Write a tiny Llama + 16 wavs under ``root``; return the overrides that use them
    (the adapter is shrunk only while the user keeps the default ``stack_mlp``)."""
    overrides = [
        "encoder=conformer_tiny",
        "llm=hf",
        f"model.pretrained_llm={make_tiny_llm(root / 'llm')}",
        f"data.train_ds.input_cfg.0.manifest_filepath={make_wav_manifest(root / 'data', n=16)}",
    ]
    if not any(o.startswith("adapter=") and o != "adapter=stack_mlp" for o in user_overrides):
        overrides.append("model.perception.modality_adapter.hidden_dim=64")
    return overrides


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config ``examples/speechlm_train.py`` would get from these overrides."""
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra.compose(config_name=name, overrides=overrides)


def machine_info(device: torch.device) -> dict:
    """CPU model, usable cores, torch's threads, torch version, GPU name."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": gpu}


def fetch_batches(
    cfg: DictConfig, model: SpeechLMModel, n: int, feature_cache=None, keep: Callable[[Batch], bool] | None = None
) -> tuple[list[Batch], int]:
    """``n`` training batches on the host, tensors only, and how many were skipped: with ``keep``,
    only batches it accepts (drawing at most ``MAX_DRAWS_PER_BATCH`` per kept one)."""
    loader = iter(build_datamodule(cfg.data, model, feature_cache).train_dataloader())
    batches, skipped = [], 0
    while len(batches) < n:
        batch = {k: v for k, v in next(loader).items() if torch.is_tensor(v)}
        if keep is None or keep(batch):
            batches.append(batch)
        elif (skipped := skipped + 1) > MAX_DRAWS_PER_BATCH * n:
            raise RuntimeError(f"Only {len(batches)} of {skipped + len(batches)} batches can be compared with SALM: "
                               f"{SPAN_REASON} Turn interleaving off (interleave.prob=0 in the data config).")
    return batches, skipped


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Copy every tensor of ``batch`` to ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def set_train_mode(model: torch.nn.Module) -> None:
    """As both ``training_step``s do: train mode, frozen preprocessor/encoder/LLM in eval (no dropout)."""
    model.train()
    for module in (model.perception.preprocessor, model.perception.encoder, model.llm):
        if is_frozen(module):
            module.eval()


def peak_memory_mib(device: torch.device) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS (cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def sequence_stats(model, batches: list[Batch], device: torch.device) -> tuple[int, int, int, float]:
    """Attended and total LLM positions after audio splicing, trained (target) tokens, and seconds of audio,
    over ``batches``."""
    attended = total = targets = 0
    for batch in batches:
        inputs = model.prepare_inputs(to_device(batch, device))
        mask = inputs["attention_mask"]
        attended, total = attended + int(mask.sum()), total + mask.numel()
        targets += int((inputs["target_ids"] != IGNORE_INDEX).sum())
    if "encoder_feature_lens" in batches[0]:  # read from the feature cache: count the encoded seconds
        return attended, total, targets, sum(int(b["encoder_feature_lens"].sum()) for b in batches) * model.encoder_frame_duration
    return attended, total, targets, sum(int(b["audio_lens"].sum()) for b in batches) / model.sampling_rate


def benchmark(model, loss_fn: LossFn, optimizer, batches: list[Batch], warmup: int, bf16: bool) -> dict:
    """Train on ``batches``: the first ``warmup`` steps untimed, the rest timed; returns the numbers."""
    device = next(model.parameters()).device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    set_train_mode(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(to_device(batch, device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    attended, total, targets, audio_seconds = sequence_stats(model, batches[warmup:], device)
    return {
        "steps": len(batches) - warmup,
        "seconds": seconds,
        "steps_per_s": (len(batches) - warmup) / seconds,
        "llm_tokens_per_s": attended / seconds,
        "target_tokens_per_s": targets / seconds,
        "audio_seconds_per_s": audio_seconds / seconds,
        "padding_share": 1 - attended / total,
        "peak_memory_mib": peak_memory_mib(device),
        "last_loss": float(loss),
    }


def speechlm_loss(model: SpeechLMModel, batch: Batch) -> torch.Tensor:
    """Our objective, as in ``SpeechLMModel.training_step``."""
    return model.compute_losses(batch)["loss"]


def salm_loss(salm: SALM, batch: Batch) -> torch.Tensor:
    """``SALM.training_step`` without logging."""
    inputs = salm.prepare_inputs(batch)
    logits = salm(inputs["input_embeds"], attention_mask=inputs["attention_mask"])["logits"]
    num_frames = (inputs["target_ids"] != -100).long().sum()
    with loss_parallel():
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), inputs["target_ids"].flatten(0, 1), reduction="sum", ignore_index=-100
        )
    return loss / num_frames


def build_salm(model: SpeechLMModel) -> tuple[SALM, list[str]]:
    """SALM with our LLM architecture, perception config and freezing, holding a copy of our weights."""
    cfg = model.cfg
    freeze = list(cfg.get("freeze_params", []))
    if not model.embed_tokens.weight.requires_grad:
        freeze.append(r"^embed_tokens\..+$")  # SALM keeps the embedding outside `llm`
    salm_cfg = {
        "pretrained_llm": resolve_llm_source(cfg.pretrained_llm),
        "pretrained_weights": False,  # no ASR/LLM download: the weights are copied from ours below
        "audio_locator_tag": cfg.audio_locator_tag,
        "perception": OmegaConf.to_container(cfg.perception, resolve=True),
        "freeze_params": freeze,
        "prevent_freeze_params": list(cfg.get("prevent_freeze_params", [])),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "encoder_chunk_size_seconds": cfg.get("encoder_chunk_size_seconds"),
    }
    if cfg.get("lora"):
        salm_cfg["lora"] = OmegaConf.to_container(cfg.lora, resolve=True)
    salm = SALM(salm_cfg)
    ours = {**model.state_dict(), "embed_tokens.weight": model.embed_tokens.weight}
    target = salm.state_dict()
    copied = {k: v for k, v in ours.items() if k in target and target[k].shape == v.shape}
    salm.load_state_dict(copied, strict=False)
    notes = [f"weights copied from ours: {len(copied)}/{len(target)} SALM tensors"]
    if salm.audio_locator_tag_id != model.audio_locator_tag_id:
        ids = f"ours {model.audio_locator_tag_id}, SALM {salm.audio_locator_tag_id}"
        notes.append(f"audio locator id: {ids} (remapped)")
    return salm, notes


def whole_utterances_only(batch: Batch) -> bool:
    """Whether every audio locator of ``batch`` stands for a whole utterance (no interleaved speech span)."""
    segments = batch.get("audio_segments")
    return segments is None or bool(((segments[:, 1] == 0) & torch.isinf(segments[:, 2])).all())


def to_salm_batch(batch: Batch, model: SpeechLMModel, salm: SALM) -> Batch:
    """Our batch as SALM takes it: SALM's pad and locator ids, and one audio per locator (ours stores each
    distinct utterance once and points locators at it through ``audio_segments``)."""
    ids = batch["input_ids"]
    new = ids.masked_fill(ids == model.text_pad_id, salm.text_pad_id)
    rows = batch["audio_segments"][:, 0].long()
    return {
        "input_ids": new.masked_fill(ids == model.audio_locator_tag_id, salm.audio_locator_tag_id),
        "loss_mask": batch["loss_mask"],
        "audios": batch["audios"][rows],
        "audio_lens": batch["audio_lens"][rows],
    }


def use_unused_pad_id(salm: SALM, batches: list[Batch]) -> str:
    """Give SALM a pad token that no batch contains, and say why.

    speechlm2 treats every token equal to its pad id as padding (no attention, no loss). Its
    default pad is the tokenizer's, which for many chat LLMs is a real token (SmolLM2: the
    end-of-turn token), so SALM would train on different inputs than ours (which adds a
    dedicated pad token outside the LLM's table; SALM embeds pad ids, so its pad must be inside).
    """
    default = salm.text_pad_id
    used = set(torch.cat([b["input_ids"].flatten() for b in batches]).tolist())
    free = max(i for i in range(salm.embed_tokens.num_embeddings) if i not in used)
    token = salm.tokenizer.ids_to_tokens([free])[0]
    salm.tokenizer.add_special_tokens({"pad_token": token})
    clashes = sum(int((b["input_ids"] == default).sum()) for b in batches)
    return (f"pad: SALM's default {default} {salm.tokenizer.ids_to_tokens([default])[0]!r} occurs {clashes} times as "
            f"text in these batches (SALM would drop it from attention and loss); SALM pads with unused {free} {token!r}")


def run_salm(model: SpeechLMModel, ours: dict, batches: list[Batch], warmup: int, bf16: bool, skipped: int) -> dict:
    """Build SALM from our current weights, check both losses agree on the same inputs, move ours off the
    device, time SALM on the batches ours was timed on."""
    device = next(model.parameters()).device
    salm, notes = build_salm(model)
    notes.append(use_unused_pad_id(salm, batches))
    if skipped:
        notes.append(f"{skipped} batches with interleaved speech spans were left out of both runs: {SPAN_REASON}")
    salm_batches = [to_salm_batch(b, model, salm) for b in batches]
    salm = salm.to(device)
    salm_optimizer = _optimizer(salm.configure_optimizers())  # applies SALM's freezing
    trainable = sum(p.numel() for p in salm.parameters() if p.requires_grad)
    notes.append(f"trainable parameters: ours {model.parameter_counts()['trainable']:,}, SALM {trainable:,}")
    losses = same_weights_losses(model, salm, batches, salm_batches, device)
    notes.append("same-weights losses (eval mode), ours vs SALM: "
                 + ", ".join(f"batch {i} {a:.6f} vs {b:.6f}" for i, (a, b) in enumerate(losses)))
    if device.type == "cpu":
        notes.append("CPU peak memory is the process's peak RSS, so SALM's includes our run")
    print("-" * 72 + "\nnemo.collections.speechlm2.SALM on the same batches\n" + "-" * 72)
    print("\n".join(f"  - {note}" for note in notes))
    worst = max(abs(a - b) for a, b in losses)
    if worst > LOSS_TOLERANCE:
        raise RuntimeError(f"Same weights, same batches, but the losses differ by {worst:.2e} (> {LOSS_TOLERANCE}): "
                           "the two models do not see the same inputs, so timing them would not compare like for like.")
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    theirs = benchmark(salm, partial(salm_loss, salm), salm_optimizer, salm_batches, warmup, bf16)
    _print_results("SALM", theirs)
    ratio = {k: ours[k] / theirs[k] for k in ("steps_per_s", "llm_tokens_per_s", "audio_seconds_per_s")}
    print("ours / SALM: " + ", ".join(f"{k} x{v:.3f}" for k, v in ratio.items()))
    return {"salm": theirs, "salm_notes": notes, "same_weights_losses": losses, "ours_over_salm": ratio}


@torch.no_grad()
def same_weights_losses(model: SpeechLMModel, salm: SALM, ours: list[Batch], theirs: list[Batch], device,
                        n: int = 3) -> list[tuple[float, float]]:
    """Both losses on the first ``n`` batches in eval mode (no dropout): equal weights and inputs give equal losses.

    TF32 off (cuDNN allows it for convolutions by default): the two models batch the same work in different
    shapes (ours encodes an utterance once and packs the LLM rows), and kernels picked per shape at TF32's 10-bit
    mantissa would differ by more than :data:`LOSS_TOLERANCE` without any difference in the inputs."""
    model.eval(), salm.eval()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            return [(float(speechlm_loss(model, to_device(a, device))), float(salm_loss(salm, to_device(b, device))))
                    for a, b in zip(ours[:n], theirs[:n])]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def run_cached(cfg: DictConfig, model: SpeechLMModel, ours: dict, batches: list[Batch], args, tmp: str, bf16: bool) -> dict:
    """Fill a feature cache for the same batches, check they and the loss match, time training from it at the
    precision of the uncached run (it was always fp32, so a bf16 comparison set bf16 against fp32)."""
    from nemo_speechlm.data.feature_cache import prepare_feature_cache

    start = time.perf_counter()
    cache = prepare_feature_cache(OmegaConf.create({"dir": f"{tmp}/features"}), model, cfg.data)
    fill_seconds = time.perf_counter() - start
    cached, _ = fetch_batches(cfg, model, len(batches), cache, whole_utterances_only if args.vs_salm else None)
    if any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, cached)):
        raise RuntimeError("The cached run drew different batches; the comparison would not be like for like.")
    device = next(model.parameters()).device
    with torch.no_grad():
        audio_loss = float(speechlm_loss(model.eval(), to_device(batches[0], device)))
        cache_loss = float(speechlm_loss(model.eval(), to_device(cached[0], device)))
    print("-" * 72 + "\nSame batches, encoder outputs read from the feature cache\n" + "-" * 72)
    print(f"  - cache filled in {fill_seconds:.1f} s (whole data set, once); batch-0 loss: audio {audio_loss:.5f}, "
          f"cache {cache_loss:.5f}")
    optimizer = _optimizer(model.configure_optimizers())
    result = benchmark(model, partial(speechlm_loss, model), optimizer, cached, args.warmup, bf16)
    _print_results("cached", result)
    speedup = result["steps_per_s"] / ours["steps_per_s"]
    print(f"cache on / off: steps/s x{speedup:.2f}")
    return {"cached": result, "cache_fill_seconds": fill_seconds, "cache_speedup": speedup,
            "batch0_loss": {"audio": audio_loss, "cache": cache_loss}}


def _optimizer(configured) -> torch.optim.Optimizer:
    """``configure_optimizers`` returns an optimizer or a Lightning dict; the scheduler is not stepped."""
    return configured["optimizer"] if isinstance(configured, dict) else configured


def _print_results(name: str, r: dict) -> None:
    print(
        f"[{name}] {r['steps_per_s']:.3f} steps/s | {r['llm_tokens_per_s']:,.0f} LLM tokens/s | "
        f"{r['audio_seconds_per_s']:.1f} audio s/s | padding {r['padding_share']:.1%} | "
        f"peak memory {r['peak_memory_mib']:,.0f} MiB | last loss {r['last_loss']:.4f}"
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="speechlm_bench_") as tmp:
        overrides = (tiny_overrides(Path(tmp), args.overrides) if args.tiny else []) + args.overrides
        if args.cache:  # cached features need a frozen encoder
            overrides.append("model.freeze_params=['^llm\\..+$','^perception\\.encoder\\..+$']")
        cfg = compose_config(args.config_name, overrides)
        OmegaConf.resolve(cfg.data)
        torch.manual_seed(cfg.get("seed", 0))
        model = SpeechLMModel(cfg.model).to(device)
        # SALM can only be given the same inputs on batches without interleaved speech spans.
        batches, skipped = fetch_batches(cfg, model, args.warmup + args.steps,
                                         keep=whole_utterances_only if args.vs_salm else None)
        bf16 = str(cfg.trainer.get("precision", 32)).startswith("bf16")
        header = {
            "overrides": overrides,
            "model_class": type(model).__name__,
            "pretrained_llm": cfg.model.pretrained_llm,
            "pretrained_asr": cfg.model.pretrained_asr,
            "encoder": cfg.model.perception.encoder.get("_target_"),
            "adapter": cfg.model.perception.modality_adapter.get("_target_"),
            "parameters": model.parameter_counts(),
            "batch": {k: v for k, v in cfg.data.train_ds.items() if k.startswith(("batch_", "use_", "num_"))},
            "precision": "bf16 autocast" if bf16 else "fp32",
            "machine": machine_info(device),
            "device": str(device),
            "timing": f"{args.warmup} warmup + {args.steps} timed steps; data loading not timed",
        }
        print("=" * 72 + "\nSpeechLM training throughput\n" + "=" * 72)
        print("\n".join(f"{key:>15}: {value}" for key, value in header.items()))
        optimizer = _optimizer(model.configure_optimizers())
        ours = benchmark(model, partial(speechlm_loss, model), optimizer, batches, args.warmup, bf16)
        del optimizer  # frees the optimizer state before SALM runs
        ours.update(mfu_of_result(model, ours, args.peak_tflops or gpu_peak_tflops(device)))
        _print_results("ours", ours)
        print(f"[ours] model FLOPs/step {ours['model_tflops_per_step']:.4g} TFLOP | achieved {ours['achieved_tflops']:.4g} "
              f"TFLOP/s | MFU " + (f"{ours['mfu']:.2%}" if ours["mfu"] is not None else "n/a (unknown peak: --peak-tflops)"))
        result = {"header": header, "ours": ours}
        if args.cache or args.vs_salm:  # our numbers stand even if a comparison run fails (readers take the last line)
            print("RESULT " + json.dumps(result, default=str), flush=True)
        if args.cache:
            result.update(run_cached(cfg, model, ours, batches, args, tmp, bf16))
        if args.vs_salm:
            result.update(run_salm(model, ours, batches, args.warmup, bf16, skipped))
        if args.cache and args.vs_salm:  # SALM has no feature cache: this is what the cache buys against it
            result["cached_over_salm"] = result["cached"]["steps_per_s"] / result["salm"]["steps_per_s"]
            print(f"ours with the feature cache / SALM: steps/s x{result['cached_over_salm']:.3f}")
        print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
