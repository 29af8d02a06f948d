"""Hierarchical paired bootstrap over (concept, unit) grids and Holm's correction across comparisons.

The likelihood evidence is a grid ``values[C, U]``: concepts (corpus labels) and, within each,
units (held-out neutral texts for steering, held-out documents of the topic for ablation). Concepts
are the population the claim is about, units are samples within a concept, so each resample draws C
concepts with replacement and then, for every drawn concept separately, U of its units with
replacement (the two-stage bootstrap of Davison & Hinkley 1997, sec. 3.8); the statistic is the
weighted mean over the drawn units. A difference between two methods is bootstrapped as one grid
of paired differences (same concept, same unit). Draws are integers from a seeded generator, the
sums have a fixed order: bounds repeat bit for bit.

p-values are two-sided bootstrap p-values (twice the smaller tail share of resampled means at or
beyond 0, counted as (k + 1) / (n + 1) so that none is 0); Holm's step-down correction (Holm 1979) controls the family-wise error across every
comparison of a verdict, so listing more comparisons does not manufacture a "beats".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.steering.bootstrap import LEVEL

__all__ = ["HierResamples", "Estimate", "estimate", "holm"]

_STREAM = 0x4E57  # this bootstrap's own stream of the run's seed


@dataclass(frozen=True)
class HierResamples:
    """Weights of every (concept, unit) cell in each of ``n`` two-stage resamples (shape: [n, C, U])."""

    weights: np.ndarray

    @classmethod
    def draw(cls, n_concepts: int, n_units: int, n: int, seed: int) -> HierResamples:
        if n_concepts < 1 or n_units < 1 or n < 1:
            raise ValueError(f"bootstrap needs >= 1 concept, unit and resample (got {n_concepts}, {n_units}, {n})")
        rng = np.random.default_rng([seed, _STREAM, n_concepts, n_units])
        concept = rng.integers(0, n_concepts, size=(n, n_concepts))  # [n, C] drawn concept of each slot
        unit = rng.integers(0, n_units, size=(n, n_concepts, n_units))  # [n, C, U] units drawn in each slot
        slot = np.arange(n)[:, None, None] * n_concepts + concept[:, :, None]  # [n, C, 1] (resample, concept)
        flat = (slot * n_units + unit).ravel()
        w = np.bincount(flat, minlength=n * n_concepts * n_units).reshape(n, n_concepts, n_units).astype(np.float64)
        return cls(w)


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # 95% percentile bounds (NaN when fewer than 2 concepts or units have a value)
    high: float
    p: float  # two-sided bootstrap p-value of "mean = 0"

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95_low": self.low, "ci95_high": self.high, "p": self.p}


def estimate(values: np.ndarray, rs: HierResamples, level: float = LEVEL) -> Estimate:
    """Mean of ``values`` (shape: [C, U], NaN = no value) over finite cells, its interval and p-value."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != rs.weights.shape[1:]:
        raise ValueError(f"values {v.shape} do not match the resamples' grid {rs.weights.shape[1:]}")
    ok = np.isfinite(v)
    if not ok.any():
        return Estimate(math.nan, math.nan, math.nan, math.nan)
    mean = float(v[ok].mean())
    if ok.any(1).sum() < 2 and ok.sum(1).max() < 2:
        return Estimate(mean, math.nan, math.nan, math.nan)
    vz = np.where(ok, v, 0.0)
    num = np.einsum("bcu,cu->b", rs.weights, vz)
    den = np.einsum("bcu,cu->b", rs.weights, ok.astype(np.float64))
    means = num[den > 0] / den[den > 0]
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # (tail count + 1) / (resamples + 1): a bootstrap never shows p = 0 (Davison & Hinkley 1997, eq. 4.11)
    tail = min(int((means <= 0).sum()), int((means >= 0).sum()))
    return Estimate(mean, float(low), float(high), min(1.0, 2.0 * (tail + 1) / (len(means) + 1)))


def holm(p: list[float]) -> list[float]:
    """Holm-adjusted p-values (NaN stays NaN and does not count towards the family size)."""
    idx = [i for i, x in enumerate(p) if not math.isnan(x)]
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: (p[i], i))):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
