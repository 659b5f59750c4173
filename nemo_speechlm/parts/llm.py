"""Loading the Hugging Face LLM and its tokenizer, from a hub id, a directory or a ``.gguf`` file."""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import tarfile
from pathlib import Path

import torch
from nemo.collections.common.tokenizers import AutoTokenizer
from transformers import AutoConfig, AutoModelForCausalLM
from transformers import AutoTokenizer as HFAutoTokenizer

from nemo_speechlm.errors import ConfigError

log = logging.getLogger(__name__)

PAD_TOKEN = "<|speechlm_pad|>"


def cache_dir() -> Path:
    return Path(os.environ.get("NEMO_SPEECHLM_CACHE", Path.home() / ".cache" / "nemo_speechlm"))


def resolve_llm_source(pretrained_llm: str) -> str:
    """Return something ``from_pretrained`` loads fast: a hub id, a directory, or a GGUF converted once.

    Loading a GGUF file dequantizes it (~30 s for 135M parameters), so the first load writes
    a normal Hugging Face directory to the cache, keyed by the file's path, size and mtime.
    """
    if not str(pretrained_llm).endswith(".gguf"):
        if not Path(pretrained_llm).expanduser().exists():
            _check_hub_model(str(pretrained_llm))
        return str(pretrained_llm)
    gguf = Path(pretrained_llm).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"pretrained_llm: GGUF file not found: {gguf}")
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    log.info("Converting %s to a Hugging Face directory at %s (once)", gguf, out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = HFAutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained:
    # rebuild it from a clean config and copy the (already dequantized) weights.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def _check_hub_model(repo_id: str) -> None:
    """Fetch (or find cached) the model's ``config.json`` first: a mistyped id, a gated model or no network
    then fail with what to do, where NeMo's tokenizer wrapper raised a ValueError traceback."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"model.pretrained_llm={repo_id!r}"
    local = "or give a local Hugging Face directory or .gguf file"
    try:
        hf_hub_download(repo_id, "config.json")
    except HFValidationError as exc:
        raise ConfigError(f"{where}: no such file or directory, and not a Hugging Face hub id", local) from exc
    except GatedRepoError as exc:
        raise ConfigError(f"{where}: a gated model on the Hugging Face hub",
                          f"accept its license on huggingface.co and set HF_TOKEN (or run `hf auth login`), {local}") from exc
    except RepositoryNotFoundError as exc:
        raise ConfigError(f"{where}: no such model on the Hugging Face hub (or it is private)", f"check the id, {local}") from exc
    except LocalEntryNotFoundError as exc:
        raise ConfigError(f"{where}: not a local path, and the Hugging Face hub could not be reached (or HF_HUB_OFFLINE "
                          "is set) and has no cached copy", f"check the network and the id, {local}") from exc


def load_tokenizer(source: str, audio_locator_tag: str) -> AutoTokenizer:
    """NeMo ``AutoTokenizer`` with the audio locator added as a special token, and a pad token
    distinct from EOS (speechlm2 treats every pad-id token as padding, so pad == eos would hide
    end-of-turn tokens from the loss and the attention)."""
    tokenizer = AutoTokenizer(source, use_fast=True)
    special = [audio_locator_tag]
    hf = tokenizer.tokenizer
    if hf.pad_token is None or hf.pad_token_id in {hf.eos_token_id, hf.bos_token_id}:
        hf.pad_token = PAD_TOKEN
        special.append(PAD_TOKEN)
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    return tokenizer


def load_llm(source: str, pretrained_weights: bool = True, config_source: str | None = None) -> torch.nn.Module:
    """The causal LM in fp32 (Lightning's precision plugin casts for bf16 training); with
    ``pretrained_weights=False``, the same architecture, randomly initialised (a ``.nemo`` fills the weights).
    ``config_source``: where the architecture comes from, if not ``source`` (a ``.nemo``'s packed config: a
    trainable-only file takes only the base *weights* from ``pretrained_llm``, whose config may have changed since).

    What speechlm2's ``load_pretrained_hf`` does, with transformers' current ``dtype`` argument: its
    ``torch_dtype`` made transformers print a deprecation line on stderr in every command that loads a model."""
    config = AutoConfig.from_pretrained(config_source or source)
    if pretrained_weights:
        llm = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32)
    else:
        llm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    check_can_splice(llm, source)
    return llm


def check_can_splice(llm, source: str) -> None:
    """We feed the LLM ``inputs_embeds`` built from its own input embedding table."""
    try:
        emb = llm.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    accepts = "inputs_embeds" in inspect.signature(llm.forward).parameters
    if not isinstance(emb, torch.nn.Embedding) or not accepts:
        raise TypeError(
            f"Cannot splice audio into {type(llm).__name__} ({source}): nemo_speechlm needs a causal LM whose "
            f"get_input_embeddings() returns an nn.Embedding and whose forward() accepts inputs_embeds "
            f"(decoder-only Hugging Face LLMs such as Llama, Qwen, Gemma, Mistral, SmolLM)."
        )


def pack_llm_files(llm, tokenizer: AutoTokenizer, out_path: Path) -> Path:
    """One tarball with the LLM config and tokenizer: a single-file NeMo artifact."""
    staging = out_path.with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = llm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(staging)
    if getattr(llm, "generation_config", None) is not None:
        llm.generation_config.save_pretrained(staging)
    tokenizer.tokenizer.save_pretrained(staging)
    with tarfile.open(out_path, "w") as tar:
        tar.add(staging, arcname="llm")
    shutil.rmtree(staging)
    return out_path


def unpack_llm_files(tar_path: str, dest: Path) -> str:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    return str(dest / "llm")
