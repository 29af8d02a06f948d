"""Optimizer and step helpers for fast SAE training: fused Adam on CUDA, optional ``torch.compile``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)


def make_adam(
    params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.Adam:
    """Adam over fp32 master weights; the single fused CUDA kernel when every parameter is on CUDA.

    The fused kernel reads and writes each parameter, gradient and both moments once per step (~28 bytes per
    parameter), instead of one launch per tensor per operation; on CPU the default (foreach) path is used, whose
    numbers are identical to the reference Adam.
    """
    params = list(params)
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused or None)


def maybe_compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``torch.compile(fn)`` when ``enabled``.

    Compilation pays on the elementwise glue (centering, casts, loss) around the matmuls; it is off by default
    because the first steps then take seconds to minutes. With the Triton backend, Dynamo may break the graph
    around the kernels' data-dependent parts (the CSC build's ``bincount``); that costs speed, not correctness.
    Not yet measured on a GPU (benchmarks/README.md).
    """
    if not enabled:
        return fn
    log.info("compiling the training step with torch.compile")
    return torch.compile(fn)
