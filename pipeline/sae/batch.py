"""Reductions over the training batch, global across data-parallel processes.

Outside :func:`across` (one process) each function is the plain PyTorch reduction, the same op as before
data parallelism existed, so single-process training is bit-for-bit unchanged.

Inside ``across(world)`` (``pipeline.train`` under torchrun) each process holds ``B / world`` rows of one global
batch of ``B`` rows. A reduction then returns its value over the *global* batch, identical on every process,
while its gradient flows only through the local rows::

    value = total + (local - local.detach())      # == total; d value / d local == 1

So each process computes the global loss with the autograd graph of its own rows, and the *sum* of the
processes' gradients (:func:`pipeline.distributed.sum_gradients_`) is the gradient one process would compute on
the whole batch, up to float summation order. Batch statistics inside the losses (the AuxK normalisation, the
KL sparsity's mean activation, BatchTopK's batch-wide threshold, the dead-latent counts) are global the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor


class Collectives(Protocol):
    """What the reductions need from the process group (``pipeline.distributed`` provides it)."""

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor: ...

    def all_gather_rows(self, t: Tensor) -> Tensor: ...


_world = 1  # processes sharing the current batch (1 outside ``across``)
_comm: Collectives | None = None


@contextmanager
def across(world: int, comm: Collectives | None = None) -> Iterator[None]:
    """Within this block the batch is split over ``world`` processes (1: not split) that ``comm`` connects.

    The collectives come in from the caller (the trainer passes ``pipeline.distributed``), so the SAE code,
    which every stage imports, does not import the process group's machinery.
    """
    global _world, _comm
    if world > 1 and comm is None:
        raise ValueError("batch.across: a batch split over processes needs their collectives")
    prev = _world, _comm
    _world, _comm = world, comm
    try:
        yield
    finally:
        _world, _comm = prev


def _c() -> Collectives:
    assert _comm is not None
    return _comm


def world() -> int:
    return _world


def rows(n_local: int) -> int:
    """Rows of the global batch, from this process's ``n_local``."""
    return n_local * _world


def mean(t: Tensor) -> Tensor:
    """Mean over dim 0 of the global batch: ``t [B_local, ...] -> [...]``; differentiable through the local rows."""
    if _world == 1:
        return t.mean(0)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32  # sum low-precision tensors in fp32
    local = t.sum(0, dtype=acc)
    total = _c().all_reduce_(local.detach().clone())
    return ((total + (local - local.detach())) / rows(t.shape[0])).to(t.dtype)


def total(t: Tensor) -> Tensor:
    """Sum over processes of a per-process statistic without gradient (counts, sums of squares); bool -> int64."""
    if _world == 1:
        return t
    return _c().all_reduce_(t.detach().long() if t.dtype == torch.bool else t.detach().clone())


def average(t: Tensor) -> Tensor:
    """Mean over processes of a per-process mean over equal-size local batches (= the global mean), no gradient."""
    if _world == 1:
        return t
    return _c().all_reduce_(t.detach().clone()) / _world


def minimum(t: Tensor) -> Tensor:
    """Minimum over processes, no gradient."""
    if _world == 1:
        return t
    return _c().all_reduce_(t.detach().clone(), op="min")


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th largest element of ``values`` over the global batch (scalar, no gradient).

    Across processes: the global top ``k`` holds at most ``k`` elements of any one process, so each contributes
    its local top ``k`` and the threshold is taken over the gathered candidates.
    """
    flat = values.detach().flatten()
    top = flat.topk(min(k, flat.numel()), sorted=False).values
    if _world > 1:
        top = _c().all_gather_rows(top)
        top = top.topk(min(k, top.numel()), sorted=False).values
    return top.min()


def keep_top(values: Tensor, k: int) -> Tensor:
    """Zero every element of ``values`` below the global batch's ``k``-th largest (ties kept).

    ``pipeline.kernels.reference.batch_threshold`` on the global batch (BatchTopK's selection of the ``B·k``
    largest activations; Bussmann et al. 2024, sec. 3).
    """
    if _world == 1:
        from pipeline.kernels.reference import batch_threshold

        return batch_threshold(values, k)
    return torch.where(values >= kth_largest(values, k), values, torch.zeros_like(values))


def gather_rows(x: Tensor) -> Tensor:
    """The global batch ``[B, ...]`` from each process's rows ``x [B_local, ...]``, in the one-process order."""
    return x if _world == 1 else _c().all_gather_rows(x.detach())
