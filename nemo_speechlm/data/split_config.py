"""How NeMo's lhotse loader reads a data split's config: one loader, or one per group (``multi_config``).

Its own module because the data module, the feature cache and the preflight checks all walk a split
this way, and the data module imports the feature cache."""
from __future__ import annotations

from typing import Iterator

from omegaconf import DictConfig, ListConfig

__all__ = ["input_entries", "loader_configs"]


def loader_configs(split_cfg: DictConfig) -> dict[str, DictConfig]:
    """The configs NeMo builds a sampler from, by key: the split itself (key ``""``), or, with
    ``multi_config: true``, each sub-config (every dict-valued key except ``sampler_weights``), as
    NeMo's multi-config loader reads them."""
    if not split_cfg.get("multi_config", False):
        return {"": split_cfg}
    return {name: c for name, c in split_cfg.items() if isinstance(c, DictConfig) and name != "sampler_weights"}


def input_entries(input_cfg) -> Iterator[DictConfig]:
    """The data entries of an ``input_cfg`` list, inside ``type: group`` entries too (a path to a YAML list: none)."""
    if not isinstance(input_cfg, ListConfig):
        return
    for entry in input_cfg:
        if entry.get("type") == "group":
            yield from input_entries(entry.get("input_cfg"))
        else:
            yield entry
