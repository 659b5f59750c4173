"""Where to run: one rule for every command's ``--device``."""
from __future__ import annotations

import torch

from nemo_speechlm.errors import InputError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:  # "Expected one of cpu, cuda, ... device type at start of device string: foo"
        raise InputError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine", "use --device cpu")
    return resolved
