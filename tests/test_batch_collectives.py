"""The collectives of one data-parallel training step (pipeline.sae.batch), counted and checked in one process.

Each blocking collective inside the loss holds every process until the slowest arrives, so their number per step is
pinned here per architecture. Their values are checked by playing both processes of a world of 2 in turn: rank 1's
buffers are recorded, then rank 0's collectives add (or gather) them, and rank 0's result must be the one-process
value on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from dist_worker import PAIRED_VARIANTS, TRITON_VARIANTS, VARIANTS, sae_config
from torch import Tensor

from pipeline.sae import batch, make_sae
from pipeline.trainstats import RunningStats


class Counting:
    """A world of 2 whose other process sends what this one does (sums: 2x; gathers: twice the rows)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        self.calls.append(f"all_reduce {op}")
        return t

    def all_gather_rows(self, t: Tensor) -> Tensor:
        self.calls.append("all_gather")
        return torch.cat([t, t])

    def all_reduce_later(self, t: Tensor) -> Callable[[], Tensor]:
        self.calls.append("all_reduce later")
        return lambda: t


# Collectives per step (the loss's, then the statistics'), as counted by the test below. Before coalescing the loss
# took 8 / 10 / 3 / 3 / 4 / 3 / 2 / 18 / 35 of them (topk dense step: recon, AuxK's normalised MSE 4, the total
# variance 2, the logged MSE again) and the statistics 4 more (counts, L0, the batch mean, the FVU sums), all blocking.
# Now: one per independent group of statistics; the step's statistics in one asynchronous all-reduce. (A TopK
# transcoder keeps the minimum of its threshold EMA, which it does not use at inference but saves.)
LOSS_COLLECTIVES = {
    "topk": 3, "batchtopk": 4, "relu_l1": 2, "relu_l1_2023": 2, "jumprelu": 2, "gated": 3, "kl": 2, "dense": 1,
    "matryoshka_batchtopk": 4, "matryoshka_per_level": 8, "transcoder": 4, "skip_transcoder_batchtopk": 4,
}


STEPS = [(v, "torch") for v in [*VARIANTS, *PAIRED_VARIANTS] if v not in TRITON_VARIANTS] + [("topk", "sparse"),
                                                                                            ("batchtopk", "sparse")]


@pytest.mark.parametrize(("name", "backend"), STEPS)  # sparse: the CPU's default step for topk and batchtopk
def test_collectives_per_training_step(name: str, backend: str) -> None:
    cfg = sae_config(name)
    sae = make_sae(cfg, seed=0).train()
    sae.kernel_backend = backend
    x = torch.randn(32, cfg.d_in, generator=torch.Generator().manual_seed(0))
    dead = torch.arange(cfg.d_sae) < 5  # AuxK has candidates
    comm = Counting()
    with batch.across(2, comm):
        out = sae.training_loss(x, 5, 10, dead, **({"target": x.flip(0)} if name in PAIRED_VARIANTS else {}))
        loss_calls = list(comm.calls)
        counts, l0 = out.firing(cfg.d_sae)
        RunningStats(torch.device("cpu")).update_later(out.loss, x, out.x_hat, l0, counts)()
    assert len(loss_calls) == LOSS_COLLECTIVES[name], loss_calls
    assert comm.calls[len(loss_calls):] == ["all_reduce later"]  # counts, L0 and the FVU sums: one, overlapped
    if "batchtopk" in name:  # BatchTopK's threshold EMA rides on the selection's gather
        assert "all_reduce min" not in loss_calls


class Rank1Then0:
    """Plays a world of 2: ``record`` mode keeps rank 1's outgoing buffers; ``replay`` mode is rank 0, whose
    collectives combine its buffers with rank 1's, in the same order."""

    def __init__(self) -> None:
        self.sent: list[Tensor] = []
        self.replay = False
        self.i = 0

    def _other(self, t: Tensor) -> Tensor:
        if not self.replay:
            self.sent.append(t.clone())
            return t
        other = self.sent[self.i]
        self.i += 1
        return other

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        other = self._other(t)
        if self.replay:
            t.copy_({"sum": t + other, "min": torch.minimum(t, other), "max": torch.maximum(t, other)}[op])
        return t

    def all_gather_rows(self, t: Tensor) -> Tensor:
        other = self._other(t)
        return torch.cat([t, other])

    def all_reduce_later(self, t: Tensor) -> Callable[[], Tensor]:
        self.all_reduce_(t)
        return lambda: t


def as_rank0(fn: Callable[[Tensor], object], x: Tensor) -> object:
    """``fn`` on rank 0's half of ``x`` in a world of 2 whose rank 1 holds the other half."""
    comm = Rank1Then0()
    half = x.shape[0] // 2
    with batch.across(2, comm):
        fn(x[half:])
        comm.replay = True
        return fn(x[:half])


def test_one_collective_moments_are_the_global_ones() -> None:
    # Halves with different means: the variance about the global mean is not the sum of the halves' own.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64) * 3 + 10
    x[:32] += 5
    (mean, sq), (var,) = as_rank0(lambda h: batch.moments(grad=[h, h.pow(2).sum(-1)], spread=[h]), x)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(sq, x.pow(2).sum(-1).mean())
    torch.testing.assert_close(var.double(), (x - x.mean(0)).pow(2).sum(-1).mean(), rtol=1e-6, atol=0)
    # The same ops as before in a world of one, to the bit.
    (m1,), (v1,) = batch.moments(grad=[x], spread=[x])
    assert torch.equal(m1, x.mean(0)) and torch.equal(v1, (x - x.mean(0)).pow(2).sum(-1).mean(0))
    a, b = as_rank0(lambda h: batch.means(h[:, 0], h[:, 1:]), x)
    torch.testing.assert_close(a, x[:, 0].mean()) and torch.testing.assert_close(b, x[:, 1:].mean(0))


@pytest.mark.parametrize("case", ["spread", "ties", "none positive"])
def test_the_selection_gather_gives_the_smallest_kept_value(case: str) -> None:
    g = torch.Generator().manual_seed(2)
    v = torch.randn(16, 12, generator=g)
    if case == "ties":  # the threshold's value on many elements, more than one process's candidates
        v[:, :6] = 0.5
    if case == "none positive":
        v = -v.abs() - 0.1
    k = 20
    theta, low = as_rank0(lambda h: batch.top_threshold(h, k), v)
    assert theta == v.flatten().topk(k).values.min()
    kept = v[(v >= theta) & (v > 0)]
    assert low == (kept.min() if kept.numel() else torch.tensor(float("inf")))


def test_step_statistics_in_one_collective_are_the_global_ones() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, generator=g) + torch.arange(6.0)
    x[:16] *= 3  # halves of other means and spreads
    x_hat = x + 0.1 * torch.randn(32, 6, generator=g)
    fired = torch.rand(32, 10, generator=g) > 0.7  # [B, d_sae]
    loss = torch.tensor(0.25)
    stats = {r: RunningStats(torch.device("cpu")) for r in (0, 1)}

    def step(h: Tensor) -> Callable[[], Tensor]:
        rank = 0 if h.data_ptr() == x.data_ptr() else 1  # as_rank0 plays rank 1 (the second half) first
        rows = slice(0, 16) if rank == 0 else slice(16, 32)
        f = fired[rows]
        return stats[rank].update_later(loss, h, x_hat[rows], f.sum(-1).float().mean(), f.sum(0))

    counts = as_rank0(step, x)()  # waited for outside the batch's block, as the trainer does (after backward)
    one = RunningStats(torch.device("cpu"))
    one.update(loss, x, x_hat, fired.sum(-1).float().mean())
    assert torch.equal(counts, fired.sum(0)) and counts.dtype == torch.int64
    torch.testing.assert_close(stats[0].sums, one.sums, rtol=1e-6, atol=0)
