"""Metric definitions against values computed by hand on tiny examples."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import metrics as M

# Two tokens, two dimensions. Worked by hand:
#   x     = [[1, 2], [3, 10]]      x_hat = [[1, 3], [2, 10]]
#   errors: token 0 (0, -1), token 1 (1, 0)  -> sum of squares 2, per dimension 1 and 1
#   sum ||x||^2 = 1 + 4 + 9 + 100 = 114
#   per-dimension mean (2, 6): total variance dim 0: 1 + 1 = 2, dim 1: 16 + 16 = 32, summed 34
X = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
X_HAT = torch.tensor([[1.0, 3.0], [2.0, 10.0]])


def test_names_are_versioned() -> None:
    names = [M.MSE, M.UNCENTERED_NMSE, M.FVU, M.L0, M.L1, M.DEAD_FRACTION, M.DENSE_FRACTION, M.SHRINKAGE,
             M.CE_LOSS_RECOVERED, M.KL_DIV, M.DELTA_LM_LOSS, M.MMCS]
    assert all("@" in n and n.split("@")[1].isdigit() for n in names)
    assert M.FVU == "fvu@2"
    # ||x - x_hat||^2 / ||x||^2 is not Gao et al.'s normalised MSE (that is the FVU): no name may read as it.
    assert M.UNCENTERED_NMSE == "uncentered_nmse@1" and M.EXCLUDING_SPECIAL[M.UNCENTERED_NMSE] == "uncentered_nmse@2"
    assert not any(n.split("@")[0] == "nmse" for n in [*names, *M.EXCLUDING_SPECIAL.values()])
    # Excluding special tokens changes the token set, so each name keeps its base and bumps its version.
    for old, new in M.EXCLUDING_SPECIAL.items():
        (b0, v0), (b1, v1) = old.split("@"), new.split("@")
        assert b0 == b1 and int(v1) == int(v0) + 1, (old, new)
    assert M.EXCLUDING_SPECIAL[M.FVU] == "fvu@3" and set(M.ALL_TOKEN_REFERENCE) <= set(M.EXCLUDING_SPECIAL)
    assert M.excluding_special({M.FVU: 0.5, "n_tokens": 3}) == {"fvu@3": 0.5, "n_tokens": 3}


def test_one_definitions_table_for_every_name() -> None:
    """pipeline.metric_names is the one table: metrics re-exports its names, the report prints its text,
    and it loads without torch (the report stage does not need it)."""
    import subprocess
    import sys

    import pipeline.metric_names as N
    from pipeline.report import DEFINITIONS
    from pipeline.report.sections import definition

    assert DEFINITIONS is N.DEFINITIONS and M.FVU is N.FVU and M.EXCLUDING_SPECIAL is N.EXCLUDING_SPECIAL
    names = [v for k, v in vars(N).items() if k.isupper() and not k.startswith("_") and isinstance(v, str)]
    assert len(names) == 19 and all(definition(n) for n in [*names, *N.EXCLUDING_SPECIAL.values()])
    assert "more than 10% of tokens" in definition(M.DENSE_FRACTION) and M.DENSE_THRESHOLD == 0.1
    code = "import sys, pipeline.metric_names; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_special_mask() -> None:
    ids = torch.tensor([[0, 5, 1], [7, 0, 2]])
    assert M.special_mask(ids, {0, 2}).tolist() == [[True, False, False], [False, True, True]]
    assert not M.special_mask(ids, {99}).any()


def test_reconstruction_metrics_by_hand() -> None:
    assert M.mse(X, X_HAT) == pytest.approx(2 / 4)  # 4 elements
    assert M.uncentered_nmse(X, X_HAT) == pytest.approx(2 / 114)
    assert M.fvu(X, X_HAT) == pytest.approx(2 / 34)  # = 0.0588235
    # The retired mean of per-dimension ratios would give (1/2 + 1/32) / 2 = 0.265625: the
    # near-constant dimension 0 dominates. fvu@2 must not be that.
    assert M.fvu(X, X_HAT) != pytest.approx(0.265625)
    # shrinkage: ||x_hat||/||x|| = sqrt(10/5) = 1.41421356 and sqrt(104/109) = 0.97679498 -> mean 1.19550427
    assert M.shrinkage(X, X_HAT) == pytest.approx(1.19550427, abs=1e-7)
    assert M.fvu(X, X) == 0.0 and M.fvu(X, X.mean(0).expand_as(X)) == pytest.approx(1.0)


def test_sparsity_metrics_by_hand() -> None:
    f = torch.tensor([[0.0, 2.0, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert M.l0(f) == pytest.approx((2 + 1 + 0) / 3)
    assert M.l1(f) == pytest.approx((3 + 3 + 0) / 3)
    counts = (f != 0).sum(0)  # [0, 1, 2, 0]
    assert M.dead_fraction(counts) == 0.5  # latents 0 and 3 never fired
    assert M.dense_fraction(counts, 3) == 0.5  # 1/3 and 2/3 > 10%
    # exactly 10% is not dense; 20% is
    assert M.dense_fraction(torch.tensor([1, 0, 0, 0]), 10) == 0.0
    assert M.dense_fraction(torch.tensor([2, 0, 0, 0]), 10) == 0.25


def test_lm_metrics_by_hand() -> None:
    assert M.ce_loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=6.0) == pytest.approx(3.5 / 4)
    assert M.delta_lm_loss(2.0, 2.5) == pytest.approx(0.5)
    assert math.isnan(M.ce_loss_recovered(2.0, 2.5, 2.0))
    # p = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4):
    # KL = 1/2 ln 2 + 1/2 ln(2/3) = 0.5 * (0.6931472 - 0.4054651) = 0.1438410
    clean = torch.tensor([[0.0, 0.0]])
    sae = torch.tensor([[0.0, math.log(3.0)]])
    assert M.kl_div(clean, sae) == pytest.approx(0.1438410, abs=1e-7)
    assert M.kl_div(clean, clean) == 0.0


def test_mmcs_by_hand() -> None:
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    B = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # row 0: max(1/sqrt 2, 0) = 0.7071068; row 1: max(1/sqrt 2, 1) = 1 -> mean 0.8535534
    assert M.mmcs(A, B) == pytest.approx(0.8535534, abs=1e-6)
    assert M.mmcs(B, A) == pytest.approx((1 / math.sqrt(2) + 1) / 2, abs=1e-6)


def test_reconstruction_accumulator_streams_exactly() -> None:
    acc = M.ReconstructionAccumulator(2)
    acc.update(X[:1], X_HAT[:1])
    acc.update(X[1:], X_HAT[1:])
    r = acc.result()
    assert r[M.FVU] == pytest.approx(2 / 34) and r[M.MSE] == pytest.approx(0.5)
    assert r[M.UNCENTERED_NMSE] == pytest.approx(2 / 114) and r[M.SHRINKAGE] == pytest.approx(1.19550427, abs=1e-7)

    # Many batches of float32 activations with a large offset (residual norms ~1e4): the float64
    # sums still give the one-shot FVU.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g) + 1e4
    x_hat = x + 0.1 * torch.randn(4000, 16, generator=g)
    acc = M.ReconstructionAccumulator(16)
    for a, b in zip(x.split(300), x_hat.split(300), strict=True):
        acc.update(a, b)
    assert acc.result()[M.FVU] == pytest.approx(M.fvu(x, x_hat), rel=1e-9)
    assert acc.result()[M.FVU] == pytest.approx(0.01, rel=0.1)  # noise variance 0.01 / unit variance


def test_reconstruction_accumulator_skips_empty_batches() -> None:
    # Excluding special tokens can leave a batch with no rows (e.g. a lone BOS); its mean must not
    # become the shift (NaN would poison every sum).
    acc = M.ReconstructionAccumulator(2)
    acc.update(X[:0], X_HAT[:0])
    acc.update(X, X_HAT)
    assert acc.result()[M.FVU] == pytest.approx(2 / 34) and acc.n == 2


def test_firing_accumulator() -> None:
    f = torch.tensor([[0.0, 2.0, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    acc = M.FiringAccumulator(4)
    acc.update(f[:2])
    acc.update(f[2:])
    r = acc.result()
    assert r == {M.L0: 1.0, M.L1: 2.0, M.DEAD_FRACTION: 0.5, M.DENSE_FRACTION: 0.5}
    assert torch.allclose(acc.frequencies(), torch.tensor([0.0, 1 / 3, 2 / 3, 0.0], dtype=torch.float64))


def test_lm_loss_accumulator() -> None:
    acc = M.LMLossAccumulator()
    # per-token CE: clean (1, 3) -> 2, sae (2, 3) -> 2.5, zero (5, 7) -> 6; KL (0.1, 0.3) -> 0.2
    acc.update(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0]), torch.tensor([5.0, 7.0]), torch.tensor([0.1, 0.3]))
    r = acc.result()
    assert r[M.CE_LOSS_RECOVERED] == pytest.approx(0.875) and r[M.DELTA_LM_LOSS] == pytest.approx(0.5)
    assert r[M.KL_DIV] == pytest.approx(0.2) and r[M.CE_CLEAN] == pytest.approx(2.0)
