"""Training-step kernels for TopK / BatchTopK SAEs (Gao et al. 2024, sparse kernels for efficient training).

* :func:`topk_sae_forward` — dispatcher: Triton kernels on CUDA, plain PyTorch on CPU (``backend="auto"``).
* :func:`sparse_decode`, :func:`topk_encode` — the Triton autograd functions (import Triton lazily);
  :func:`pipeline.kernels.autograd.topk_encode_aux` also selects the AuxK code from the same encoder pass
  (what ``pipeline.sae``'s topk/batchtopk training step uses with ``train.kernels``).
* :mod:`pipeline.kernels.decoder_norm` — fused unit-norm decoder projection / renormalisation (``pipeline.sae.ops``).
* :mod:`pipeline.kernels.reference` — the plain-PyTorch definitions the kernels are tested against.

Triton is an optional dependency (``pip install 'sae-pipeline[gpu]'``); without it everything here still works
through the PyTorch path.
"""

from __future__ import annotations

from typing import Any

from pipeline.kernels.dispatch import SparseCode, resolve_backend, topk_sae_forward, triton_status
from pipeline.kernels.reference import sparse_decode_torch, topk_sae_forward_torch
from pipeline.kernels.step import make_adam, maybe_compile

__all__ = [
    "SparseCode",
    "make_adam",
    "maybe_compile",
    "resolve_backend",
    "sparse_decode",
    "sparse_decode_torch",
    "topk_encode",
    "topk_sae_forward",
    "topk_sae_forward_torch",
    "triton_status",
]


def __getattr__(name: str) -> Any:
    # Triton-backed functions are imported on first use, so `import pipeline.kernels` never needs Triton.
    if name in ("sparse_decode", "topk_encode"):
        from pipeline.kernels import autograd

        return getattr(autograd, name)
    raise AttributeError(f"module 'pipeline.kernels' has no attribute {name!r}")
