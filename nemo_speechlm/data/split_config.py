"""How NeMo's lhotse loader reads a data split's config: one loader, or one per group (``multi_config``).

Its own module because the data module, the feature cache and the preflight checks all walk a split
this way, and the data module imports the feature cache."""
from __future__ import annotations

from omegaconf import DictConfig

__all__ = ["loader_configs"]


def loader_configs(split_cfg: DictConfig) -> dict[str, DictConfig]:
    """The configs NeMo builds a sampler from, by key: the split itself (key ``""``), or, with
    ``multi_config: true``, each sub-config (every dict-valued key except ``sampler_weights``), as
    NeMo's multi-config loader reads them."""
    if not split_cfg.get("multi_config", False):
        return {"": split_cfg}
    return {name: c for name, c in split_cfg.items() if isinstance(c, DictConfig) and name != "sampler_weights"}
