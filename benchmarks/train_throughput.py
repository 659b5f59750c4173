"""Training throughput of a ``SpeechLMModel`` config, optionally against NeMo's own SALM.

    python benchmarks/train_throughput.py [--config-name speechlm] [--steps 20] [--warmup 3]
        [--device cuda|cpu] [--tiny] [--vs-salm] [--cache] [hydra overrides ...]

Batches are fetched from the train dataloader before timing (loading is not timed, the copy to
the device is). A step is forward + backward + optimizer step. Last line: ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor.parallel import loss_parallel

import nemo_speechlm  # noqa: F401  (resolvers, data types, target allow-list)
from nemo.collections.speechlm2 import SALM
from nemo.collections.speechlm2.parts.optim_setup import is_frozen
from nemo_speechlm.data.datamodule import build_datamodule
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.llm import resolve_llm_source
from nemo_speechlm.tiny_assets import make_tiny_llm, make_wav_manifest

CONF_DIR = nemo_speechlm.CONF_DIR
Batch = dict
LossFn = Callable[[Batch], torch.Tensor]


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
    """CPU model, usable cores, torch version, GPU name."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "gpu": gpu}


def fetch_batches(cfg: DictConfig, model: SpeechLMModel, n: int, feature_cache=None) -> list[Batch]:
    """``n`` training batches on the host, tensors only."""
    loader = iter(build_datamodule(cfg.data, model, feature_cache).train_dataloader())
    return [{k: v for k, v in next(loader).items() if torch.is_tensor(v)} for _ in range(n)]


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
def sequence_stats(model, batches: list[Batch], device: torch.device) -> tuple[int, int, float]:
    """Attended and total LLM positions after audio splicing, and seconds of audio, over ``batches``."""
    attended = total = 0
    for batch in batches:
        mask = model.prepare_inputs(to_device(batch, device))["attention_mask"]
        attended, total = attended + int(mask.sum()), total + mask.numel()
    if "encoder_feature_lens" in batches[0]:  # read from the feature cache: count the encoded seconds
        return attended, total, sum(int(b["encoder_feature_lens"].sum()) for b in batches) * model.encoder_frame_duration
    return attended, total, sum(int(b["audio_lens"].sum()) for b in batches) / model.sampling_rate


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
    attended, total, audio_seconds = sequence_stats(model, batches[warmup:], device)
    return {
        "steps": len(batches) - warmup,
        "seconds": seconds,
        "steps_per_s": (len(batches) - warmup) / seconds,
        "llm_tokens_per_s": attended / seconds,
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
    if salm.text_pad_id != model.text_pad_id:
        token = salm.tokenizer.ids_to_tokens([salm.text_pad_id])[0]
        notes.append(f"pad id: ours {model.text_pad_id} (dedicated), SALM {salm.text_pad_id} {token!r} (remapped)")
    return salm, notes


def to_salm_batch(batch: Batch, model: SpeechLMModel, salm: SALM) -> Batch:
    """Our batch with our pad/locator ids replaced by SALM's."""
    ids = batch["input_ids"]
    new = ids.masked_fill(ids == model.text_pad_id, salm.text_pad_id)
    return {**batch, "input_ids": new.masked_fill(ids == model.audio_locator_tag_id, salm.audio_locator_tag_id)}


def run_salm(model: SpeechLMModel, ours: dict, batches: list[Batch], warmup: int, bf16: bool) -> dict:
    """Build SALM from our current weights, check both losses agree, move ours off the device, time SALM."""
    device = next(model.parameters()).device
    salm, notes = build_salm(model)
    salm_batches = [to_salm_batch(b, model, salm) for b in batches]
    clashes = sum(int(((b["input_ids"] == salm.text_pad_id) & (b["input_ids"] != model.text_pad_id)).sum())
                  for b in batches)
    if clashes:
        notes.append(f"{clashes} text tokens equal SALM's pad id: SALM drops them from attention and loss")
    salm = salm.to(device)
    salm_optimizer = _optimizer(salm.configure_optimizers())  # applies SALM's freezing
    trainable = sum(p.numel() for p in salm.parameters() if p.requires_grad)
    notes.append(f"trainable parameters: ours {model.parameter_counts()['trainable']:,}, SALM {trainable:,}")
    with torch.no_grad():  # eval mode: no dropout, so equal weights must give equal losses
        ours_loss = float(speechlm_loss(model.eval(), to_device(batches[0], device)))
        their_loss = float(salm_loss(salm.eval(), to_device(salm_batches[0], device)))
    notes.append(f"same-weights loss on batch 0 (eval mode): ours {ours_loss:.5f}, SALM {their_loss:.5f}")
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        notes.append("CPU peak memory is the process's peak RSS, so SALM's includes our run")
    print("-" * 72 + "\nnemo.collections.speechlm2.SALM on the same batches\n" + "-" * 72)
    print("\n".join(f"  - {note}" for note in notes))
    theirs = benchmark(salm, partial(salm_loss, salm), salm_optimizer, salm_batches, warmup, bf16)
    _print_results("SALM", theirs)
    ratio = {k: ours[k] / theirs[k] for k in ("steps_per_s", "llm_tokens_per_s", "audio_seconds_per_s")}
    print("ours / SALM: " + ", ".join(f"{k} x{v:.3f}" for k, v in ratio.items()))
    return {"salm": theirs, "salm_notes": notes, "ours_over_salm": ratio}


def run_cached(cfg: DictConfig, model: SpeechLMModel, ours: dict, batches: list[Batch], args, tmp: str) -> dict:
    """Fill a feature cache for the same batches, check they and the loss match, time training from it."""
    from nemo_speechlm.data.feature_cache import prepare_feature_cache

    start = time.perf_counter()
    cache = prepare_feature_cache(OmegaConf.create({"dir": f"{tmp}/features"}), model, cfg.data)
    fill_seconds = time.perf_counter() - start
    cached = fetch_batches(cfg, model, len(batches), cache)
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
    result = benchmark(model, partial(speechlm_loss, model), optimizer, cached, args.warmup, False)
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
        batches = fetch_batches(cfg, model, args.warmup + args.steps)
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
        _print_results("ours", ours)
        result = {"header": header, "ours": ours}
        if args.cache:
            result.update(run_cached(cfg, model, ours, batches, args, tmp))
        if args.vs_salm:
            result.update(run_salm(model, ours, batches, args.warmup, bf16))
        print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
