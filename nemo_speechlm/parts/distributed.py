"""Several processes before ``trainer.fit``: work done once before training (the frozen-encoder
feature cache) is shared out across ranks, on each rank's own device, then a barrier.

Lightning creates the other processes and the process group inside ``fit``. With ``strategy=ddp``
and no external launcher (no ``torchrun``/SLURM), rank 0 re-runs the training command for
ranks 1..N-1 at that moment. :func:`start_ranks` does both now instead, right after ``exp_manager``
(so the children inherit its log-directory version, as they would at ``fit``); ``fit`` then finds
``LOCAL_RANK`` set and the process group initialised and does neither again. Under ``torchrun`` or
SLURM every rank already runs the script from the start: only the process group is created early.
"""
from __future__ import annotations

import subprocess
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _launch_process_observer
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from nemo.utils import logging

from nemo_speechlm.parts.fsdp import FSDP2_STRATEGY_NAME, fsdp2_strategy


def start_ranks(trainer: Trainer) -> None:
    """Start the other ranks and the process group now rather than in ``fit`` (no-op on one device).

    Only strategies with a process group (``ddp``, ``fsdp``, ``fsdp2``, ...) and the script launcher are
    started early; ``ddp_spawn`` and ``ddp_notebook`` start theirs inside ``fit`` only, and the
    pre-fit work then runs in each process unshared, as before.
    """
    if trainer.world_size <= 1:
        return
    strategy = trainer.strategy
    launcher = getattr(strategy, "_launcher", None)
    external = strategy.cluster_environment.creates_processes_externally  # torchrun, SLURM, or a child rank
    model_parallel = isinstance(strategy, ModelParallelStrategy)  # trainer.strategy=fsdp2
    # ModelParallelStrategy has no launcher where the processes are created externally; DDP always has one.
    script_launched = isinstance(launcher, _SubprocessScriptLauncher) or (model_parallel and external)
    if not script_launched or not (model_parallel or hasattr(strategy, "setup_distributed")):
        logging.info(f"{type(strategy).__name__} starts its processes inside fit: pre-fit work is not shared across ranks")
        return
    if not external:
        launcher._call_children_scripts()  # what launcher.launch() does in fit; sets LOCAL_RANK=0 here
        _launch_process_observer(launcher.procs)
    if model_parallel:
        # Its setup_environment also builds the device mesh and hands it to the model, which does not exist yet
        # (fit does that part); _setup_distributed is the rest: this rank's device + init_process_group.
        strategy._setup_distributed()
    else:
        strategy.setup_environment()  # this rank's device + init_process_group; fit skips an initialised group
    logging.info(f"Rank {dist.get_rank()} of {dist.get_world_size()} started before fit on {strategy.root_device}")


@contextmanager
def stop_started_ranks_on_failure(trainer: Trainer) -> Iterator[None]:
    """Rank 0 failing (an exception, Ctrl-C) ends the ranks it started (:func:`start_ranks`), then re-raises.

    Otherwise they waited in their next collective until the process group's timeout (Lightning's default:
    30 minutes) holding their GPUs: NCCL does not notice that a peer has exited (gloo does: "Connection closed by
    peer"), and Lightning kills the children itself only on Ctrl-C inside ``fit``. The failures this is for hit
    rank 0 alone: its share of the feature cache (a file that decodes badly), an OOM on its GPU, a full disk
    while it writes the ``.nemo``. A child rank's failure already ends rank 0 (Lightning's process observer);
    under ``torchrun`` or SLURM the launcher ends the job.
    """
    try:
        yield
    except SystemExit as e:
        if e.code != 0:  # (0: a clean stop, such as NeMo's preemption callback after its checkpoint)
            _end_children(trainer)
        raise
    except BaseException:
        _end_children(trainer)
        raise


def _end_children(trainer: Trainer) -> None:
    launcher = getattr(trainer.strategy, "_launcher", None)
    children = getattr(launcher, "procs", None) if isinstance(launcher, _SubprocessScriptLauncher) else None
    if not children:
        return
    # Lightning's process observer watches this very list and SIGKILLs rank 0 too (exit 137, not the error's own
    # code) once it sees a child that exited non-zero, which a killed child is: emptied first, it stops watching.
    procs = list(children)
    children.clear()
    logging.error(f"Rank 0 failed: ending the {len(procs)} rank(s) it started")
    signal = _get_sigkill_signal()
    for proc in procs:
        proc.send_signal(signal)  # (skips one already gone)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a process in uninterruptible sleep (a hung driver): not waited for
            logging.error(f"Rank process {proc.pid} did not end within 30 s of SIGKILL")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (no-op without a process group).

    For weights every rank computes before ``fit`` (connector pre-alignment: the same summed gradients on every
    rank): GPU kernels are not bit-deterministic, so the ranks' copies may differ in the last bits. DDP broadcasts
    rank 0's model when it wraps it; FSDP2 does not, and would shard the slightly different copies, one shard each."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=0)


def sum_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor in place by its sum over the ranks, all in one all-reduce (no-op without a process
    group). For data-parallel work before ``fit`` (connector pre-alignment's gradients), where no DDP wrapper is."""
    if not tensors or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def means_over_ranks(totals: dict[str, list[float]]) -> dict[str, list[float]]:
    """Weighted means over every rank of running totals ``{name: [weight, weighted sum 1, weighted sum 2, ...]}``:
    ``{name: [mean 1, mean 2, ...]}``, names no rank weighed left out. Every rank calls it (a collective), one
    that saw nothing with ``{}``; names may differ between ranks (a rank drew no batch of a loader), which is
    why the totals travel as objects rather than in a fixed-size all-reduce."""
    gathered = [totals]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, totals)
    combined: dict[str, list[float]] = {}
    for part in gathered:
        for name, values in part.items():
            into = combined.setdefault(name, [0.0] * len(values))
            for i, value in enumerate(values):
                into[i] += value
    return {name: [value / into[0] for value in into[1:]] for name, into in sorted(combined.items()) if into[0] > 0}


@contextmanager
def encoding_on_this_rank_only(model) -> Iterator[None]:
    """Encode speech on this rank alone, for work before ``fit`` where ranks encode different numbers of batches
    (their shares of the feature cache or of a pre-alignment batch).

    NeMo's Conformer (FastConformer, Canary, Parakeet) all-reduces its longest input in every forward
    (``sync_max_audio_length``) so every rank's positional table has the same size (DDP broadcasts buffers).
    Ranks calling it unequally deadlock (NCCL, gloo). It is switched off here and the tables are made equal
    afterwards with one all-reduce. A no-op on one rank and for encoders without the setting (Whisper)."""
    encoder = model.perception.encoder
    if not getattr(encoder, "sync_max_audio_length", False) or rank_and_world()[1] == 1:
        yield
        return
    encoder.sync_max_audio_length = False
    try:
        yield
    finally:
        encoder.sync_max_audio_length = True
    longest = torch.tensor([float(encoder.max_audio_length)], device=model.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    if int(longest.item()) > encoder.max_audio_length:
        encoder.set_max_audio_length(int(longest.item()))


def _device_count(devices) -> int | None:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    return devices if isinstance(devices, int) and devices > 0 else None  # "auto" / -1: unknown before launch


def resolve_strategy(trainer_cfg: dict) -> dict:
    """The configs name a DDP strategy for several devices (``ddp_find_unused_parameters_true``: a joint SFT
    text-only batch leaves the speech side without gradient). On one device (``devices * num_nodes == 1``)
    Lightning would still wrap the model in DDP with a process group of one; use ``auto`` (no wrapper) then.
    ``fsdp2`` (our name; Lightning has no string for it) becomes FSDP2 over all devices (``parts/fsdp.py``)."""
    strategy = trainer_cfg.get("strategy")
    count = _device_count(trainer_cfg.get("devices", 1))
    if strategy == FSDP2_STRATEGY_NAME:
        trainer_cfg["strategy"] = fsdp2_strategy(None if count is None else count * int(trainer_cfg.get("num_nodes") or 1))
        return trainer_cfg
    if isinstance(strategy, str) and strategy.startswith("ddp") and count is not None and count * int(trainer_cfg.get("num_nodes") or 1) == 1:
        trainer_cfg["strategy"] = "auto"
    return trainer_cfg
