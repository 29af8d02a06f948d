"""One rule for turning a device param into a ``torch.device``, shared by every stage."""

from __future__ import annotations

import torch

from pipeline.errors import UserError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """'auto' -> cuda when present, else cpu; a bad or unavailable device is a UserError naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}: {name!r} is not a device (use auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}: {name!r} requested but CUDA is not available (use auto or cpu)")
    return device
