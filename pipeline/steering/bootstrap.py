"""Percentile bootstrap over (prompt, feature) units: how sure is a steering mean, or a difference of two?

Every steering number is a mean over a grid of units, test prompts x features (``values[P, F]``,
one value per unit at the coefficient chosen for that feature). Both axes are samples: the prompts
of a population of neutral openings, the features of the SAE's features. Units that share a prompt
are correlated (a prompt that is hard to steer is hard for every feature), and so are units that
share a feature, so resampling single units as if independent would understate the uncertainty.

We use the two-way ("pigeonhole") bootstrap of Owen (2007, "The pigeonhole bootstrap", Ann. Appl.
Stat. 1(2)): each resample draws P prompts and, independently, F features with replacement and
takes the mean over their product grid (a unit drawn as prompt twice and feature three times counts
six times). Owen shows its variance is mildly conservative for crossed random effects; with a single
feature it is the ordinary cluster bootstrap over prompts. The interval is the percentile interval
(Efron & Tibshirani 1993, ch. 13) of the resampled means. A *difference* between two methods is
bootstrapped as one grid of paired differences (same prompt, same feature), which removes the
prompt and feature effects the two methods share: the paired interval is the basis of a verdict.

All methods and differences of one metric share the same resampled index sets (:class:`Resamples`),
drawn from a seeded generator with integer draws only, so the bounds repeat bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["LEVEL", "Resamples", "Interval", "interval"]

LEVEL = 0.95  # two-sided coverage of every interval (keys say ``ci95``)
_STREAM = 0xB007  # the bootstrap's own stream of ``seed``, apart from the prompt shuffle's default_rng(seed)


@dataclass(frozen=True)
class Interval:
    mean: float  # mean over the grid's finite units (the point estimate)
    low: float  # percentile bounds of the resampled means (NaN when nothing is finite)
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95_low": self.low, "ci95_high": self.high}


@dataclass(frozen=True)
class Resamples:
    """Multiplicities of prompts and features in each of ``n`` two-way resamples.

    ``prompts[b, p]`` is how often prompt p was drawn in resample b (each row sums to P); the same for
    ``features`` (shape: [n, F]).
    """

    prompts: np.ndarray  # [n, P] int64
    features: np.ndarray  # [n, F] int64

    @classmethod
    def draw(cls, n_prompts: int, n_features: int, n: int, seed: int) -> Resamples:
        if n_prompts < 1 or n_features < 1 or n < 1:
            raise ValueError(f"bootstrap needs >= 1 prompt, feature and resample (got {n_prompts}, {n_features}, {n})")
        rng = np.random.default_rng([seed, _STREAM])
        return cls(_counts(rng.integers(0, n_prompts, size=(n, n_prompts)), n_prompts),
                   _counts(rng.integers(0, n_features, size=(n, n_features)), n_features))


def _counts(idx: np.ndarray, k: int) -> np.ndarray:
    """Draws ``idx[n, m]`` in [0, k) -> multiplicities (shape: [n, k]); O(n * (m + k)) memory."""
    n = idx.shape[0]
    return np.bincount((idx + k * np.arange(n)[:, None]).ravel(), minlength=n * k).reshape(n, k).astype(np.int64)


def interval(values: np.ndarray, rs: Resamples, level: float = LEVEL) -> Interval:
    """Mean of ``values`` (shape: [P, F], NaN = no value for that unit) and its percentile bootstrap interval.

    A resample in which every drawn unit is NaN has no mean and is left out of the percentiles. With
    fewer than 2 prompts that have a value the bounds are NaN: resampling one prompt says nothing about
    how the mean varies over prompts, and a zero-width interval would pass for certainty.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (rs.prompts.shape[1], rs.features.shape[1]):
        raise ValueError(f"values {values.shape} do not match the resamples' grid "
                         f"({rs.prompts.shape[1]}, {rs.features.shape[1]})")
    ok = np.isfinite(values)
    if not ok.any():
        return Interval(math.nan, math.nan, math.nan)
    if ok.any(1).sum() < 2:
        return Interval(float(values[ok].mean()), math.nan, math.nan)
    v = np.where(ok, values, 0.0)
    w_p, w_f = rs.prompts.astype(np.float64), rs.features.astype(np.float64)
    # sum_{p,f} n_p n_f v[p, f] / sum_{p,f} n_p n_f ok[p, f]; integer-valued weights, fixed summation order.
    num = np.einsum("bp,pf,bf->b", w_p, v, w_f)
    den = np.einsum("bp,pf,bf->b", w_p, ok.astype(np.float64), w_f)
    means = num[den > 0] / den[den > 0]
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(v.sum() / ok.sum()), float(low), float(high))
