"""The training stream: split across DDP ranks, and continued where a resumed run stopped.

Our data types declare themselves iterable (like tarred data), for which NeMo gives every rank the
*whole* stream (its sampler runs with ``world_size=1``) and relies on different shuffling seeds per
rank and worker; with ``num_workers: 0`` those seeds are all equal, so every DDP rank trained on the
same batches. :class:`ResumableDataModule` sets ``force_map_dataset: true`` on the training loaders
(unless ``force_iterable_dataset`` is set): the lhotse sampler then runs in the training process and
gives rank ``r`` of ``N`` batches ``r, r+N, ...`` of the one stream (disjoint, nothing dropped);
the dataset still loads the audio of each batch (in the dataloader workers when ``num_workers > 0``).

Lightning restores the model, optimizer, scheduler and step counters from a checkpoint, but not
the position of a lhotse sampler: a resumed run would see the first batches again. Our training
streams are endless (the lhotse loaders repeat the data) and deterministic given their seeds
(``shard_seed: randomized`` resolves to one fixed value with ``num_workers`` loading in the main
process's sampler), so the position is a count: the batches each rank has drawn from this stream, which the
checkpoint records: where the run's stream started (0, or what a resume skipped) plus ``accumulate_grad_batches``
batches per step since (a resume with another ``accumulate_grad_batches`` used to skip by its own, training
batches twice or never; a checkpoint written after a resume with other data, devices or accumulation counted
every step of the run from 0, so the next resume skipped batches never trained). On resume,
:class:`ResumableDataModule` replays that many batches through the *sampler* (cut metadata only, no audio
decoded; the first pass over local files reads their headers, as in any run) before training starts, group draws of a
multi-config (joint SFT) sampler included.

The position belongs to one stream: each checkpoint records the training data config it was made
with and its number of ranks (the datamodule's ``state_dict``), and a run resumed with other training data
(another manifest, weights, batch size, seed) or on another number of devices (which splits the stream
otherwise) starts its new stream at the first batch, with a warning naming what changed, instead of skipping
that many batches of data it never saw.

Not restored: a loader with ``force_iterable_dataset: true``, whose sampler runs inside each dataloader
worker; it starts the stream again, with a warning. (Tarred and Shar inputs of our data types resume
like JSONL: ``force_map_dataset`` puts their sampler in the training process too.)
"""
from __future__ import annotations

from nemo.collections.speechlm2.data import DataModule
from nemo.utils import logging


class _SkipFirst:
    """``sampler`` whose first iteration drops its first ``n`` batches."""

    def __init__(self, sampler, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self):
        it = iter(self.sampler)
        skip, self.n = self.n, 0
        for _ in range(skip):
            next(it)
        return it

    def __getattr__(self, name):  # state_dict, set_epoch, ... of the wrapped sampler
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def skip_batches(loader, n: int) -> bool:
    """Make the (map-style) lhotse ``loader`` start ``n`` batches into its stream; False if it cannot."""
    source = getattr(loader, "_source", loader)  # NeMo's BroadcastingDataLoader wraps the DataLoader
    if source is None:  # a rank that receives its batches by broadcast
        return True
    sampler = getattr(source, "sampler", None)
    if sampler is None or not hasattr(sampler, "diagnostics"):  # not a lhotse CutSampler: iterable dataset
        return False
    object.__setattr__(source, "sampler", _SkipFirst(sampler, n))  # DataLoader forbids plain assignment after init
    return True


def split_across_ranks(data_cfg) -> None:
    """``force_map_dataset: true`` on each training loader config (the split, or each group of a
    ``multi_config``) that does not ask for an iterable dataset."""
    from omegaconf import DictConfig, open_dict

    train = data_cfg.get("train_ds")
    if train is None:
        return
    loaders = ([c for k, c in train.items() if isinstance(c, DictConfig) and k != "sampler_weights"]
               if train.get("multi_config", False) else [train])
    for loader in loaders:
        if not loader.get("force_iterable_dataset", False) and loader.get("force_map_dataset") is None:
            with open_dict(loader):
                loader.force_map_dataset = True


class ResumableDataModule(DataModule):
    """speechlm2's ``DataModule`` whose training stream is split across ranks and, after a resume,
    skips the batches already trained on."""

    def __init__(self, cfg, tokenizer, dataset) -> None:
        split_across_ranks(cfg)
        super().__init__(cfg, tokenizer=tokenizer, dataset=dataset)
        self._changed_data: list[str] = []  # set on resume when the checkpoint's run trained on other data
        self._batches_per_rank: int | None = None  # how far each rank had read the stream, from the checkpoint
        self._stream_start = (0, 0)  # (global step, batches per rank already read) where this run's stream began

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the stream, how far each rank has read it, and over how many ranks."""
        trainer = self.trainer
        start_step, start_batches = self._stream_start
        read = start_batches + (trainer.global_step - start_step) * trainer.accumulate_grad_batches
        return {"train_stream": _stream_config(self.cfg), "batches_per_rank": read, "ranks": trainer.world_size}

    def load_state_dict(self, state_dict: dict) -> None:
        from nemo_speechlm.parts.runner import changed_values

        saved = state_dict.get("train_stream")
        if saved is not None:
            self._changed_data = [f"data.train_ds.{k}: {old!r} -> {new!r}"
                                  for k, old, new in changed_values(saved, _stream_config(self.cfg))]
        ranks = state_dict.get("ranks")
        if ranks is not None and self.trainer is not None and ranks != self.trainer.world_size:
            self._changed_data.append(f"ranks (devices x nodes): {ranks} -> {self.trainer.world_size}")
        self._batches_per_rank = state_dict.get("batches_per_rank")

    def train_dataloader(self):
        loader = super().train_dataloader()
        trainer = self.trainer
        consumed = 0
        if trainer is not None and trainer.global_step:  # checkpoints before 2026-12-07 lack the count
            consumed = self._batches_per_rank or trainer.global_step * trainer.accumulate_grad_batches
        skipped = 0
        if consumed and self._changed_data:
            logging.warning(f"Resumed at step {trainer.global_step} with other training data than the checkpoint's run "
                            f"({'; '.join(self._changed_data[:5])}): the new stream starts at its first batch")
        elif consumed:
            if skip_batches(loader, consumed):
                logging.info(f"Resumed at step {trainer.global_step}: the training stream skips {consumed} batches")
                skipped = consumed
            else:
                logging.warning(f"Resumed at step {trainer.global_step}: this training stream (an iterable dataset) "
                                "cannot skip the batches already trained on and starts again")
        self._stream_start = (trainer.global_step if trainer is not None else 0, skipped)
        return loader


# Loading settings that do not change which batches the stream gives (its sampler runs in the training process).
_LOADING_ONLY = ("num_workers", "pin_memory", "prefetch_factor", "persistent_workers")


def _stream_config(data_cfg) -> dict:
    """The training split's config as plain data, without loading-only settings."""
    from omegaconf import OmegaConf

    train = OmegaConf.to_container(data_cfg.get("train_ds") or {}, resolve=True)
    return {k: v for k, v in train.items() if k not in _LOADING_ONLY}
