"""Shared tiny-but-real assets: a Llama LLM + BPE tokenizer, a NeMo CTC ``.nemo``, wav files + manifest."""
import datetime
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest
from omegaconf import OmegaConf

import nemo_speechlm  # noqa: F401  (allow-list, registries)
from tests.tiny_assets import make_tiny_asr_nemo, make_tiny_llm, make_wav_manifest, tiny_conformer_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("assets")
    return {
        "llm": make_tiny_llm(root / "llm"),
        "asr": make_tiny_asr_nemo(root / "asr.nemo"),
        "manifest": make_wav_manifest(root / "data", n=8),
        "root": root,
    }


def model_config(llm_dir, **overrides) -> OmegaConf:
    """A SpeechLMModel config with the tiny conformer encoder and a frame-stacking adapter."""
    cfg = {
        "pretrained_llm": str(llm_dir),
        "audio_locator_tag": "<|audio|>",
        "freeze_params": [r"^llm\..+$"],
        "perception": {
            **tiny_conformer_config(),
            "modality_adapter": {
                "_target_": "nemo_speechlm.modules.adapters.FrameStackingAdapter",
                "input_dim": "${..encoder.d_model}",
                "output_dim": 0,
                "stack": 2,
                "hidden_dim": 64,
            },
        },
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def nemo_weights(path) -> dict:
    """The state dict stored in a ``.nemo`` file (what it holds, whatever a restore would add from references)."""
    import tarfile

    import torch

    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model_weights.ckpt"))
        return torch.load(tar.extractfile(member), map_location="cpu")


def run_python(code: str, cwd=None, timeout=600) -> str:
    """Run ``code`` in a fresh Python process (a real restore has no state from this one)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def run_on_ranks(fn: Callable, world: int, tmp_dir: Path, *args) -> dict:
    """``fn(rank, *args)`` in ``world`` forked processes, in a gloo process group when ``world`` > 1 (no group for 1:
    the one-process reference); returns ``{rank: what fn returned}``. The group times out after 60 s, so a
    collective one rank never joins fails the test instead of hanging it."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    init_file = Path(tempfile.mkdtemp(dir=tmp_dir)) / "gloo-init"
    mp.start_processes(_rank_process, args=(world, str(init_file), fn, args, results), nprocs=world, start_method="fork")
    return dict(results)


def _rank_process(rank: int, world: int, init_file: str, fn: Callable, args: tuple, results) -> None:
    import torch

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive the fork
        results[rank] = fn(rank, *args)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
