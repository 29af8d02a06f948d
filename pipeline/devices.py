"""One rule for turning a device param into a ``torch.device``, and one map from a dtype param to a
``torch.dtype``, shared by every stage."""

from __future__ import annotations

import torch

from pipeline.errors import UserError

# A dtype param (model.dtype, the SAE's cfg.json dtype, ...) -> torch's dtype. Each user narrows the choice.
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


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
