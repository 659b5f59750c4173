"""Loading models for inference, evaluation and data generation, in one place: a ``.nemo`` of
ours (:func:`load_model`), its identity for resuming (:func:`model_id` for a file, :func:`model_identity` for a
model in memory), and a NeMo ASR model
(:func:`load_asr_model`). The device rule is :func:`~nemo_speechlm.parts.device.resolve_device`; the
model's base LLM is in :mod:`nemo_speechlm.models.base_llm`.
"""
from __future__ import annotations

import hashlib
import tarfile
from datetime import datetime
from pathlib import Path

import torch

from nemo_speechlm.errors import InputError
from nemo_speechlm.models.speechlm_model import SpeechLMModel
from nemo_speechlm.parts.checkpoint import restore_checked
from nemo_speechlm.parts.device import resolve_device


def load_model(path: str | Path, device: str = "auto", bf16: bool = False) -> SpeechLMModel:
    """Restore a ``.nemo`` for inference (eval mode, no gradients needed).

    ``bf16`` casts only the LLM (most of the weights) to bfloat16 and needs CUDA; the
    preprocessor and encoder stay fp32 (mel features in bf16 are not supported), and the
    adapter's fp32 output is cast where it is spliced into the LLM's embeddings. A file that is not
    a ``.nemo`` of ours raises :class:`~nemo_speechlm.parts.checkpoint.CheckpointError` saying what it is.
    """
    target = resolve_device(device)
    if bf16 and target.type != "cuda":
        raise InputError("bf16 inference needs a CUDA device (on CPU, bf16 is slower than fp32)", "drop --bf16")
    model = restore_checked(SpeechLMModel, path, map_location=target)
    model = model.to(target).eval()
    if bf16:
        model.llm.to(torch.bfloat16)
    return model


def model_id(path: str | Path) -> str:
    """Identity of a model file for resuming: its absolute path and modification time, so that
    predictions of a retrained model written to the same path are not mixed with old ones."""
    path = Path(path).resolve()
    if not path.exists():
        return str(path)
    return f"{path} (modified {datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec='seconds')})"


def model_identity(model: torch.nn.Module, model_name: str | None = None) -> str:
    """``model_name`` (the CLI gives :func:`model_id`), or, for a model handed over in memory, a digest of its
    weights: the library's evaluation and inference functions resume their answers under it, and refuse an
    output that another model wrote. Keyed by ``None``, a notebook that evaluated a model, trained on and
    evaluated again into the same folder got the first model's answers back as the second's.

    The digest covers every tensor's name, shape, dtype and bytes, read one tensor at a time (on the host:
    the same weights give the same digest on any device)."""
    if model_name is not None:
        return model_name
    digest = hashlib.blake2b(digest_size=8)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return f"{type(model).__name__} in memory, weights {digest.hexdigest()}"


def llm_dtype(model: torch.nn.Module) -> str:
    """The LLM's weight dtype (``load_model(bf16=True)`` casts it): evaluations and inference record it, so a run
    resumed in bf16 does not mix its answers with fp32 ones under the same model name."""
    return str(next(model.llm.parameters()).dtype).removeprefix("torch.")


# A settings record written before the dtype was recorded: made in fp32 (--bf16 was rarely used; it is refused
# then, to be safe, rather than mixed).
DTYPE_DEFAULT = {"llm_dtype": "float32"}


def load_asr_model(name_or_path: str | Path, device: str | torch.device | None = None):
    """Restore a NeMo ASR ``.nemo`` file or download a pretrained one by name, in eval mode."""
    from nemo.collections.asr.models import ASRModel

    device = torch.device(device) if device is not None else None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".nemo" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"ASR model file not found: {path}")
        try:
            model = ASRModel.restore_from(str(path), map_location=device)
        except (tarfile.ReadError, EOFError) as e:  # a truncated or non-tar file: a traceback from tarfile
            raise InputError(f"{path}: not a readable .nemo archive ({e})", "copy or export the ASR model again") from e
    else:
        model = ASRModel.from_pretrained(str(name_or_path), map_location=device)
    return model.eval()
