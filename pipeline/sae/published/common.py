"""What every importer returns, and the pieces they share.

An importer reads one SAE folder in its library's layout and returns a :class:`Foreign`: an SAE of this
pipeline (eval mode, CPU) whose ``encode`` / ``decode`` equal the source library's, plus what the folder
says about where it came from (the hook and model in the source's own names), which
:mod:`pipeline.sae.published.source` maps and checks against the params.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.sae.base import SAE, make_sae
from pipeline.sae.config import SAEConfig
from pipeline.sae.io import _load_state

DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Foreign:
    """An imported SAE and the source's own description of it."""

    sae: SAE
    format: str  # saelens | gemmascope | sparsify | dictionary_learning
    hook: str | None  # the hook in the source's vocabulary (``blocks.9.hook_resid_post``), None if unknown
    model: str | None  # the model the SAE was trained on, as the source names it, None if unknown
    files: list[Path]  # the files read (hashed into the provenance)
    notes: dict[str, Any] = field(default_factory=dict)  # what else is worth recording (architecture, versions)
    hook_out: str | None = None  # a transcoder: the hook it predicts, in the source's vocabulary (None: unknown)


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES.get(t.dtype, "float32")


def build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], path: Path) -> SAE:
    """An SAE of ``cfg`` holding ``tensors`` (names as in our modules); wrong names or shapes: one line naming
    ``path``."""
    sae = make_sae(cfg, seed=0)  # weights are overwritten; a seed keeps the global RNG untouched
    _load_state(sae, {k: v.contiguous() for k, v in tensors.items()}, path)
    return sae.eval()


def need(t: dict[str, torch.Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in t]
    if missing:
        raise UserError(f"{path}: missing tensors {missing} (has {sorted(t)})")


def shape_of(t: torch.Tensor, shape: tuple[int, ...], name: str, path: Path) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise UserError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def log_threshold(theta: torch.Tensor) -> torch.Tensor:
    """Our jumprelu stores log(theta) (theta > 0 by construction); a threshold <= 0 becomes the smallest float32
    normal, which keeps every positive pre-activation as ReLU(z)·1{z > theta} does."""
    return theta.float().clamp_min(torch.finfo(torch.float32).tiny).log()
