"""Frozen-encoder feature cache: run the speech encoder once over the training audio.

With a frozen encoder (MTBI's default), every epoch would recompute identical encoder
outputs. The cache stores them on disk, one ``.npy`` per utterance, under
``<dir>/<fingerprint>/``:

* the key of an utterance is its audio file, offset and duration, and the file's size and
  modification time: audio rewritten in place (normalised, denoised, re-synthesized) gets new
  features instead of its path's stale ones; a copy that does not keep modification times
  (``cp -r``; ``rsync -a`` keeps them) is encoded again. Shar and tarred audio have no file of
  their own and are keyed by their recording id;
* the fingerprint hashes the preprocessor + encoder config and weights, so a changed
  encoder reads from a new directory and never sees stale features;
* each file is written to a temporary name and renamed, so a crash leaves no partial
  file and :func:`fill_feature_cache` resumes with the utterances still missing;
* features are stored in fp32 or, when training runs in bf16-true (where the adapter casts them
  to bf16 anyway), in bf16: half the disk and reading, the same training numbers. A bf16 cache
  lives in its own ``<fingerprint>-bf16`` directory (``feature_cache.dtype``).

Interleaved speech spans are slices of their whole utterance's features (see
``nemo_speechlm.data.dataset``), so only whole utterances are ever cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from lhotse.cut import Cut
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from nemo.utils import logging

from nemo_speechlm.data.split_config import input_entries, loader_configs
from nemo_speechlm.data.utterance import source_utterance, utterance_key
from nemo_speechlm.errors import ConfigError
from nemo_speechlm.parts.audio_decoding import read_cut_audio

# Filled in after the encoder is built or restored: not part of what it computes.
_NON_ARCHITECTURE_KEYS = ("load_pretrained_weights",)

# ``feature_cache.dtype`` -> how the features are stored. numpy has no bf16: bf16 features are
# stored as their raw 16-bit patterns (int16 ``.npy``) and viewed back as bf16 on load.
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_dtype(cache_cfg: DictConfig, precision: str | int | None) -> torch.dtype:
    """The storage dtype ``feature_cache.dtype`` asks for; null = bf16 when ``trainer.precision`` is
    bf16-true (the adapter's weights are bf16, so fp32 features would be rounded to bf16 anyway:
    storing them rounded is lossless for training), else fp32 (bf16-mixed and fp32 read fp32 features)."""
    name = cache_cfg.get("dtype")
    if name is None:
        return torch.bfloat16 if str(precision) == "bf16-true" else torch.float32
    if name not in CACHE_DTYPES:
        raise ConfigError(f"feature_cache.dtype={name!r} is not one of {sorted(CACHE_DTYPES)} (or null: bfloat16 "
                          "when trainer.precision=bf16-true, else float32)")
    return CACHE_DTYPES[name]


def encoder_fingerprint(perception: torch.nn.Module, perception_cfg: DictConfig, chunk_seconds: float | None = None) -> str:
    """16 hex digits over the preprocessor/encoder config, every encoder weight and, when set, the chunk length long
    clips are encoded in (``model.encoder_chunk_size_seconds``: other chunks, other features; it was left out, and a
    run with another setting read the first one's)."""
    digest = hashlib.sha256()
    if chunk_seconds is not None:  # absent: existing caches keep their fingerprint
        digest.update(json.dumps({"encoder_chunk_size_seconds": float(chunk_seconds)}).encode())
    for part in ("preprocessor", "encoder"):
        cfg = OmegaConf.to_container(perception_cfg.get(part) or {}, resolve=True)
        for key in _NON_ARCHITECTURE_KEYS:
            cfg.pop(key, None)
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for module in (perception.preprocessor, perception.encoder):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            # reshape(-1): 0-d tensors (BatchNorm's num_batches_tracked in a Conformer) cannot be viewed
            # as bytes; the bytes of every other tensor are unchanged, and so are existing fingerprints.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Encoder outputs ``(frames, d_model)`` on disk, keyed by :func:`utterance_key`, stored as ``dtype``."""

    def __init__(self, directory: str | Path, fingerprint: str, dtype: torch.dtype = torch.float32,
                 batch_size: int = 8) -> None:
        if dtype not in CACHE_DTYPES.values():
            raise ValueError(f"feature cache dtype {dtype} is not one of {list(CACHE_DTYPES.values())}")
        # fp32 caches keep the bare fingerprint, as before the bf16 option existed.
        self.root = Path(directory) / (fingerprint if dtype == torch.float32 else f"{fingerprint}-bf16")
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.batch_size = batch_size  # utterances encoded together when filling (feature_cache.batch_size)

    def path(self, cut: Cut) -> Path:
        key = utterance_key(cut)
        return self.root / key[:2] / f"{key}{_file_stamp(cut)}.npy"

    def __contains__(self, cut: Cut) -> bool:
        return self.path(cut).is_file()

    def load(self, cut: Cut) -> torch.Tensor:
        path = self.path(cut)
        if not path.is_file():
            raise FileNotFoundError(
                f"No cached encoder features for {cut.recording.sources[0].source} "
                f"(offset {cut.start}, duration {cut.duration}) in {self.root}; run the feature "
                "cache fill first (the training recipe does it when feature_cache.dir is set)."
            )
        stored = torch.from_numpy(np.load(path))
        return stored.view(torch.bfloat16) if self.dtype == torch.bfloat16 else stored

    def save(self, cut: Cut, features: torch.Tensor) -> None:
        path = self.path(cut)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        stored = features.detach().cpu().to(self.dtype)
        with open(tmp, "wb") as f:
            np.save(f, (stored.view(torch.int16) if self.dtype == torch.bfloat16 else stored).numpy())
        os.replace(tmp, path)


def _file_stamp(cut: Cut) -> str:
    """``-<size>-<mtime ns>`` of the cut's audio file ("" for audio inside Shar or tar archives)."""
    sources = cut.recording.sources
    if not sources or sources[0].type != "file":
        return ""
    try:
        stat = os.stat(sources[0].source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"audio file not found: {sources[0].source} (needed to key its cached features)") from exc
    return f"-{stat.st_size}-{stat.st_mtime_ns}"


@torch.no_grad()
def fill_feature_cache(model, cache: FeatureCache, cuts: list[Cut], batch_size: int | None = None) -> dict[str, int]:
    """Encode every cut not yet in ``cache`` (resumable) on ``model.device``, ``batch_size`` (default: the
    cache's) at a time in the order given; returns counts for the log.

    An utterance's features depend on the batch it was encoded in by rounding only (~1e-4: the padded
    length and batch size change how the GEMMs are blocked); callers that want the same features
    whatever else is cached fill in a fixed order (the training recipe: the pre-alignment manifest first).

    With a process group (``nemo_speechlm.parts.distributed.start_ranks``), rank ``r`` of ``N`` encodes the
    uncached distinct utterances ``r, r+N, ...``, listed between two barriers (so every rank lists the same ones), then
    every rank waits at a barrier, so all of them read a full cache. Split before dropping what was cached, a
    fill resumed after a crash left one rank its whole share while the others waited at the barrier, past NCCL's
    timeout on a large corpus.
    """
    from nemo_speechlm.parts.distributed import barrier, encoding_on_this_rank_only, rank_and_world

    batch_size = batch_size or cache.batch_size
    rank, world = rank_and_world()
    distinct: dict[str, Cut] = {}
    for cut in cuts:
        distinct.setdefault(utterance_key(cut), cut)
    barrier()  # no rank lists the cache while another still writes to it ...
    uncached = [cut for cut in distinct.values() if cut not in cache]
    barrier()  # ... nor writes while another still lists it (a slow lister saw fewer, and its stride missed some)
    todo = uncached[rank::world]
    counts = {"utterances": len(distinct), "cached_before": len(distinct) - len(uncached), "encoded": 0}
    if world > 1:
        counts.update(rank=rank, this_rank=len(todo))
    was_training = model.training
    model.eval()
    try:
        with encoding_on_this_rank_only(model), \
                tqdm(total=len(todo), desc="Caching encoder features", unit="utt") as bar:
            for start in range(0, len(todo), batch_size):
                batch_cuts = todo[start : start + batch_size]
                wavs = [torch.from_numpy(read_cut_audio(c, model.sampling_rate)) for c in batch_cuts]
                lens = torch.tensor([len(w) for w in wavs])
                audio = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
                for cut, feats in zip(batch_cuts, model.encode_speech(audio.to(model.device), lens.to(model.device))):
                    cache.save(cut, feats)
                counts["encoded"] += len(batch_cuts)
                bar.update(len(batch_cuts))
    finally:
        model.train(was_training)
    barrier()
    logging.info(f"Feature cache {cache.root}: {counts}")
    return counts


def _audio_turns(data_cfg: DictConfig, splits: tuple[str, ...] = ("train_ds", "validation_ds"), interleave: bool = True):
    """``(whole utterance cut, start s, end s, turn)`` for every audio turn of ``splits`` (one pass), without the
    examples the loader's ``min_duration``/``max_duration`` drop; ``interleave=False`` reads every line whole."""
    from nemo.collections.common.data.lhotse.cutset import read_cutset_from_config
    from nemo.collections.common.data.lhotse.sampling import DurationFilter
    from nemo.collections.common.data.lhotse.text_adapters import AudioTurn

    for split in splits:
        if data_cfg.get(split) is None:
            continue
        for loader_cfg in loader_configs(data_cfg[split]).values():  # each group of a multi_config split
            split_cfg = OmegaConf.create(OmegaConf.to_container(loader_cfg, resolve=True))
            split_cfg.force_finite = True  # one pass, not the endless training stream
            if not interleave:
                for entry in input_entries(split_cfg.get("input_cfg")):
                    if entry.get("interleave") is not None:
                        entry.interleave.prob = 0.0
            kept = DurationFilter(split_cfg.get("min_duration"), split_cfg.get("max_duration"))
            conversations, _ = read_cutset_from_config(split_cfg)
            for conversation in conversations:
                if not kept(conversation):
                    continue
                for turn in getattr(conversation, "turns", []):
                    if isinstance(turn, AudioTurn):
                        yield (*source_utterance(turn.cut), turn)


def utterances_in(data_cfg: DictConfig) -> list[Cut]:
    """Every distinct whole utterance the train/validation data will ask for (one pass over the data)."""
    found: dict[str, Cut] = {}
    for source, _, _, _ in _audio_turns(data_cfg):
        found.setdefault(utterance_key(source), source)
    return list(found.values())


def transcribed_utterances(data_cfg: DictConfig) -> list[tuple[Cut, str]]:
    """Every distinct whole utterance of the *training* data whose audio turn carries its transcript, with that
    transcript. Read with interleaving off: a line drawn as interleaved in the one pass used to be left out (its
    spans stand for parts of it), about 30% of MTBI's utterances and every token only they had; and without the
    validation data, which the connector also trained on."""
    found: dict[str, tuple[Cut, str]] = {}
    for source, start, end, turn in _audio_turns(data_cfg, splits=("train_ds",), interleave=False):
        if start == 0.0 and end == float("inf") and isinstance(turn.text, str) and turn.text.strip():
            found.setdefault(utterance_key(source), (source, turn.text))
    return list(found.values())


def open_feature_cache(cache_cfg: DictConfig | None, model, precision: str | int | None = None) -> FeatureCache | None:
    """The cache for ``model``'s encoder (``feature_cache`` config; None when off), not filled yet.
    ``precision`` is the trainer's (``trainer.precision``): it picks the storage dtype when ``feature_cache.dtype`` is null."""
    if not cache_cfg or not cache_cfg.get("dir"):
        return None
    perception = model.perception
    trainable = [n for n, p in perception.named_parameters() if p.requires_grad and not n.startswith(("modality_adapter", "proj"))]
    if trainable or perception.spec_augmentation is not None:
        raise ConfigError(
            "feature_cache needs a frozen encoder without spec augmentation (cached features never change); "
            f"trainable encoder parameters: {trainable[:3]}, spec_augment: {perception.spec_augmentation is not None}. "
            "Freeze it with model.freeze_params: ['^perception\\\\.encoder\\\\..+$', ...] or set feature_cache.dir=null."
        )
    cache = FeatureCache(cache_cfg.dir, encoder_fingerprint(perception, model.cfg.perception,
                                                             model.cfg.get("encoder_chunk_size_seconds")),
                         cache_dtype(cache_cfg, precision), batch_size=cache_cfg.get("batch_size", 8))
    others = sorted(p.name for p in Path(cache_cfg.dir).glob("*") if p.is_dir() and p != cache.root)
    if others:  # nothing deletes them: another run may still use them, and only the user knows
        logging.info(f"{cache_cfg.dir} also holds {len(others)} feature cache(s) this run does not read ({', '.join(others[:4])}"
                     f"{', ...' if len(others) > 4 else ''}): other encoder settings, weights or storage dtype. "
                     f"Delete those no run needs to free the disk; this run's is {cache.root.name}.")
    return cache


def prepare_feature_cache(cache_cfg: DictConfig | None, model, data_cfg: DictConfig,
                          precision: str | int | None = None) -> FeatureCache | None:
    """:func:`open_feature_cache`, filled for every utterance of ``data_cfg``."""
    cache = open_feature_cache(cache_cfg, model, precision)
    if cache is not None:
        fill_feature_cache(model, cache, utterances_in(data_cfg))
    return cache
