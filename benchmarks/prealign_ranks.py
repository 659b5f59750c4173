"""Connector pre-alignment (stage 1) in one process vs split across N ranks: steps/s, final loss, and how far the
two aligned connectors are apart.

    python benchmarks/prealign_ranks.py [--tiny] [--ranks 2] [--steps 200] [--batch-size 16] [--utterances 256]
        [--device cpu|cuda] [hydra overrides of nemo_speechlm/conf/mtbi.yaml ...]

The utterances are the demo's corpus (its request grammar spoken by espeak-ng; ``--tiny``: synthetic wavs and
tiny parts), encoded once into a feature cache, as the MTBI recipe does before stage 1. Then ``pretrain_connector_ctc``
runs ``--steps`` steps of ``--batch-size`` utterances from the same initial connector, first in one process,
then on ``--ranks`` processes (gloo on CPU, NCCL with one GPU per rank), where each rank computes its share
of every batch and the gradients are summed over the ranks (what ``trainer.devices=N`` does before ``fit``).
On CPU every process, in both runs, gets ``--threads`` threads (default ``cores / ranks``): each process stands
in for one device, so the ratio is what N devices gain over one (a GPU rank has its own GPU). The same cores
split between the ranks is not that question: one process with every core then did as well as the ranks
(0.91x on 2 cores, docs/throughput.md). SpecAugment draws different masks on each rank (seeded ``seed + rank``), so the
connectors differ by more than summation order unless ``model.perception.modality_adapter.spec_augment=null``.
Each aligned connector then transcribes ``--heldout`` held-out utterances (greedy CTC, no LLM): its WER is what the
split changes for a user.
Default parts: the demo's (Whisper tiny.en, SmolLM2-135M-Instruct). Last line: ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import soundfile
import torch
import torch.multiprocessing as mp

import nemo_speechlm  # noqa: F401  (resolvers, target allow-list)
from nemo_speechlm.data.conversations import cut_for_audio
from nemo_speechlm.data.feature_cache import FeatureCache, encoder_fingerprint, fill_feature_cache
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.connector_ctc import ALIGNED_CONNECTOR_PREFIXES, connector_transcripts, pretrain_connector_ctc
from nemo_speechlm.parts.metrics import word_error_rate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.tiny_assets
from tests.tiny_assets import make_tiny_llm, make_wav_manifest  # noqa: E402
from convergence import corpus as convergence_corpus  # noqa: E402
from train_throughput import compose_config, machine_info  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + conformer, synthetic wavs (smoke test)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--utterances", type=int, default=256)
    p.add_argument("--heldout", type=int, default=40, help="held-out utterances the aligned connector transcribes")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every process (default: cores / ranks)")
    p.add_argument("--out", default=None, help="keep the corpus, cache and connectors here (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of mtbi.yaml")
    args = p.parse_intermixed_args()
    if args.ranks < 2 or args.steps < 1 or args.batch_size < 1 or args.utterances < 1:
        p.error("--ranks must be >= 2; --steps, --batch-size and --utterances >= 1")
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        p.error(f"--ranks {args.ranks} needs as many GPUs; {torch.cuda.device_count()} visible")
    return args


def model_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    if args.tiny:
        parts = ["encoder=conformer_tiny", "llm=hf", f"model.pretrained_llm={make_tiny_llm(root / 'llm')}",
                 "model.perception.modality_adapter.hidden_dim=64", "model.perception.modality_adapter.stack=2"]
    else:
        parts = ["model.perception.encoder.pad_to_window=false"]  # as the demo encodes (examples/demo.py)
    return parts + list(args.overrides)


def build_model(overrides: list[str], seed: int) -> SpeechLMModel:
    """The same initial model in every process: the config's seed before construction."""
    cfg = compose_config("mtbi", overrides)
    torch.manual_seed(seed)
    return SpeechLMModel(cfg.model)


def make_corpus(args: argparse.Namespace, root: Path, sample_rate: int) -> tuple[list, list]:
    """``(wav path, transcript)`` pairs: ``--utterances`` to train on and ``--heldout`` to score the connector on.
    The demo's corpus (request grammar, its voices; held-out sentences new combinations of seen words), or
    synthetic wavs with ``--tiny``."""
    if args.tiny:
        manifest = make_wav_manifest(root / "data", n=args.utterances + args.heldout, sample_rate=sample_rate)
        pairs = [(e["audio_filepath"], e["text"]) for e in map(json.loads, manifest.read_text().splitlines())]
        return pairs[: args.utterances], pairs[args.utterances :]
    train, heldout = convergence_corpus(root, args.utterances, args.heldout)
    return ([(e["audio_filepath"], e["text"]) for e in map(json.loads, m.read_text().splitlines())] for m in (train, heldout))


def utterances_of(corpus: list[tuple[str, str]]) -> list:
    return [(cut_for_audio(path, 0.0, soundfile.info(path).duration), text) for path, text in corpus]


def run_rank(rank: int, world: int, args: argparse.Namespace, overrides: list[str], corpus, heldout, cache_dir: str,
             fingerprint: str, root: str, threads: int) -> None:
    """One process of one run: pre-align, time it, and (rank 0) write the connector and the numbers."""
    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and object transfers use the current device
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{root}/init{world}",
                                             rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    try:
        model = build_model(overrides, seed=0).to(device)
        cache = FeatureCache(cache_dir, fingerprint)
        utterances = utterances_of(corpus)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = pretrain_connector_ctc(model, utterances, args.steps, batch_size=args.batch_size, feature_cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:  # what the aligned connector hears: greedy CTC on held-out speech, no LLM (outside the group:
        model.eval()  # a NeMo Conformer would otherwise wait in every forward for ranks that have finished)
        hyps = connector_transcripts(model, [soundfile.read(path, dtype="float32")[0] for path, _ in heldout])
        result["heldout_connector_wer"] = round(word_error_rate([text for _, text in heldout], hyps)["wer"], 4)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(ALIGNED_CONNECTOR_PREFIXES)}
        torch.save({"state": state, "seconds": seconds, "result": result}, Path(root) / f"run{world}.pt")


def main() -> None:
    args = parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="prealign_ranks_"))
    root.mkdir(parents=True, exist_ok=True)
    overrides = model_overrides(args, root)
    model = build_model(overrides, seed=0)
    corpus, heldout = make_corpus(args, root, model.sampling_rate)
    fingerprint = encoder_fingerprint(model.perception, model.cfg.perception)
    cache = FeatureCache(root / "features", fingerprint)
    fill_feature_cache(model.to(args.device if args.device == "cpu" else "cuda:0"), cache, [c for c, _ in utterances_of(corpus)])
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the ranks get GPU 0 without the parent's cached blocks
    cores = len(os.sched_getaffinity(0))
    runs = {}
    threads = args.threads or max(1, cores // args.ranks)
    for world in (1, args.ranks):
        (root / f"init{world}").unlink(missing_ok=True)  # a crashed run's rendezvous file would be joined again
        mp.start_processes(run_rank, args=(world, args, overrides, corpus, heldout, str(cache.root.parent), fingerprint, str(root), threads),
                           nprocs=world, start_method="spawn")
        runs[world] = torch.load(root / f"run{world}.pt")
    one, split = runs[1], runs[args.ranks]
    worst = max(float((one["state"][k].float() - split["state"][k].float()).abs().max()) for k in one["state"] if one["state"][k].numel())
    speedup = one["seconds"] / split["seconds"]
    print(f"Stage 1: {args.steps} steps x {args.batch_size} utterances ({args.utterances} utterances, cached features), "
          f"overrides {overrides}")
    print(f"Machine: {machine_info(torch.device('cuda:0' if args.device == 'cuda' else 'cpu'))}; {threads} CPU threads per process")
    for world, run in runs.items():
        print(f"  {world} rank{'s' if world > 1 else ''}: {args.steps / run['seconds']:.2f} steps/s, "
              f"CTC loss {run['result']['first_loss']} -> {run['result']['final_loss']}, "
              f"held-out connector WER {run['result']['heldout_connector_wer']:.1%} ({len(heldout)} utterances)")
    print(f"  {args.ranks} ranks / 1 process: {speedup:.2f}x steps/s; largest connector weight difference {worst:.2e}")
    print("RESULT " + json.dumps({"ranks": args.ranks, "steps": args.steps, "batch_size": args.batch_size, "device": args.device, "threads_per_process": threads,
                                  "seconds": {w: round(r["seconds"], 2) for w, r in runs.items()}, "speedup": round(speedup, 3),
                                  "final_loss": {w: r["result"]["final_loss"] for w, r in runs.items()},
                                  "heldout_connector_wer": {w: r["result"]["heldout_connector_wer"] for w, r in runs.items()},
                                  "max_weight_difference": worst, "overrides": overrides}))


if __name__ == "__main__":
    main()
