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

Each global value costs one collective, which blocks the step. Statistics that are independent of each other
are therefore taken together (:func:`means`, :func:`moments`, :func:`totals_later`: one flattened all-reduce
for several of them), a total variance in one collective instead of two (:func:`moments`, Chan et al.'s
pairwise combination), and what is only needed after backward is reduced asynchronously
(:func:`totals_later`). ``tests/test_distributed.py`` counts the collectives of each architecture's step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor


class Collectives(Protocol):
    """What the reductions need from the process group (``pipeline.distributed`` provides it)."""

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor: ...

    def all_gather_rows(self, t: Tensor) -> Tensor: ...

    def all_reduce_later(self, t: Tensor) -> Callable[[], Tensor]: ...


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


def _acc(ts: Sequence[Tensor]) -> torch.dtype:
    """The dtype local sums of ``ts`` are taken in: float64 if any is, else float32 (low precision summed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _flat_sum(parts: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Sum over processes of each detached ``parts[i]`` with ONE all-reduce: cut back into their shapes, in ``dtype``."""
    buf = _c().all_reduce_(torch.cat([p.detach().reshape(-1).to(dtype) for p in parts]))
    return [t.view_as(p) for t, p in zip(buf.split([p.numel() for p in parts]), parts, strict=True)]


def means(*ts: Tensor) -> list[Tensor]:
    """:func:`mean` of each of ``ts`` (independent of each other), with one all-reduce for all of them.

    One process: ``[t.mean(0) for t in ts]``, as :func:`mean`. Across processes the local sums travel in one
    buffer (float64 if any tensor is float64, else float32, as :func:`mean` sums), each differentiable through
    its local rows.
    """
    if _world == 1:
        return [t.mean(0) for t in ts]
    acc = _acc(ts)
    local = [t.sum(0, dtype=acc) for t in ts]
    n = rows(ts[0].shape[0])
    return [((tot + (lo - lo.detach())) / n).to(t.dtype) for tot, lo, t in zip(_flat_sum(local, acc), local, ts, strict=True)]


def moments(grad: Sequence[Tensor] = (), spread: Sequence[Tensor] = ()) -> tuple[list[Tensor], list[Tensor]]:
    """Means over the global batch of each ``grad`` tensor ``[B_local, ...]`` (differentiable, as :func:`mean`)
    and the total variance ``E_n ||x_n - mean(x)||^2`` of each ``spread`` tensor ``[B_local, d]`` (detached,
    float32 scalar), all with ONE all-reduce.

    One process: ``t.mean(0)`` and ``(x - x.mean(0)).pow(2).sum(-1).mean(0)``, the plain two-pass ops. Across
    processes the variance cannot wait for the global mean (a second collective): each process sends its rows'
    sum ``s_r``, its sum of squares about its own mean ``S_r`` and ``||s_r||^2 / n_r``, in float64, and
    ``n Var = sum_r S_r + sum_r ||s_r||^2 / n_r - ||sum_r s_r||^2 / n`` (Chan, Golub & LeVeque 1979, the
    pairwise update). The difference of the last two terms cancels only the processes' mean offsets, in float64:
    far inside float32's rounding of the one-process value.
    """
    if _world == 1:
        return [t.mean(0) for t in grad], [(x - x.mean(0)).pow(2).sum(-1).mean(0) for x in spread]
    acc = torch.float64
    local = [t.sum(0, dtype=_acc(grad)) for t in grad]
    parts: list[Tensor] = [*local]
    for x in spread:
        x64 = x.detach().double()
        s = x64.sum(0)
        parts += [s, (x64 - s / x.shape[0]).pow(2).sum().reshape(1), (s.pow(2).sum() / x.shape[0]).reshape(1)]
    tot = _flat_sum(parts, acc)
    n = rows(grad[0].shape[0] if grad else spread[0].shape[0])
    out_means = [((t_.to(lo.dtype) + (lo - lo.detach())) / n).to(t.dtype)
                 for t_, lo, t in zip(tot[:len(grad)], local, grad, strict=True)]
    out_spread = []
    for i in range(len(spread)):
        s, S, q = tot[len(grad) + 3 * i: len(grad) + 3 * i + 3]
        out_spread.append(((S + q - s.pow(2).sum() / n) / n).reshape(()).float())
    return out_means, out_spread


def totals_later(*ts: Tensor) -> Callable[[], list[Tensor]]:
    """Sums over processes of per-process statistics (no gradient; ints exact below 2**53), in ONE all-reduce
    started now and waited for when the returned function is called: what the step needs only after backward
    (firing counts, logged sums) travels while backward runs. Each result has its tensor's shape and dtype.
    One process: the tensors themselves."""
    if _world == 1:
        return lambda: list(ts)
    parts = [t.detach().reshape(-1).double() for t in ts]
    wait = _c().all_reduce_later(torch.cat(parts))

    def result() -> list[Tensor]:
        buf = wait()
        return [b.view_as(t).to(t.dtype) for b, t in zip(buf.split([p.numel() for p in parts]), ts, strict=True)]

    return result


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
    return top_threshold(values, k)[0]


def top_threshold(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(theta, low)``: :func:`kth_largest` and the smallest positive element ``>= theta`` of the global batch
    (``inf`` if none), i.e. the smallest positive value a selection ``values >= theta`` keeps; scalars, one
    collective for both.

    ``low`` needs no collective of its own: every element ``>= theta`` of a process is among its local top ``k``
    candidates, or equals ``theta`` (an element outside them lies below ``k`` of its own process's ``>= theta``
    ones), so the gathered candidates hold it exactly.
    """
    flat = values.detach().flatten()
    top = flat.topk(min(k, flat.numel()), sorted=False).values
    if _world > 1:
        top = _c().all_gather_rows(top)
        top = top.topk(min(k, top.numel()), sorted=False).values
    theta = top.min()
    low = torch.where((top >= theta) & (top > 0), top, torch.full_like(top, float("inf"))).min()
    return theta, low


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
