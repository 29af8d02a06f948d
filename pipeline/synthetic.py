"""Synthetic activation datasets with known sparse structure, for tests and training benchmarks.

Each token is a sparse non-negative combination of ``k_true`` of ``n_features`` random unit
directions plus small Gaussian noise (the toy model of superposition, Elhage et al. 2022), so an
SAE with enough latents can drive FVU close to the noise floor. Written shard by shard through
the public activation API, so the generator needs memory for one shard only, whatever the size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.activations import ActivationWriter, Manifest


def synthetic_rows(n: int, d_model: int, n_features: int, k_true: int, rng: np.random.Generator,
                   directions: np.ndarray, noise: float = 0.01) -> np.ndarray:
    """``n`` tokens ``[n, d_model]`` float32: ``k_true`` features per token, magnitudes in [0.5, 2.5).

    Features are drawn with replacement (a repeat just adds magnitudes): O(n k) instead of the
    O(n n_features) of sampling without replacement, so gigabyte datasets generate quickly.
    """
    idx = rng.integers(0, n_features, size=(n, k_true))  # [n, k]
    mag = rng.uniform(0.5, 2.5, size=(n, k_true)).astype(np.float32)  # [n, k]
    x = np.einsum("nk,nkd->nd", mag, directions[idx])  # [n, d_model]
    x += noise * rng.standard_normal((n, d_model), dtype=np.float32)
    return x


def write_synthetic_activations(root: str | Path, n_tokens: int, d_model: int, n_features: int | None = None,
                                k_true: int = 4, seed: int = 0, hook: str = "synthetic", dtype: str = "float16",
                                shard_rows: int = 65536, context_length: int = 128, scale: float = 1.0,
                                sample_seed: int = 0, split: str = "train") -> Manifest:
    """Write a dataset of ``n_tokens`` synthetic activations to ``root`` (one shard in memory at a time).

    ``seed`` fixes the feature directions; ``sample_seed`` the tokens drawn from them, so a
    held-out split is the same ``seed`` with another ``sample_seed``. ``scale`` multiplies every
    vector (real residual streams have norms ~100).
    """
    n_features = n_features or 4 * d_model
    dir_rng = np.random.default_rng([seed, 0])
    directions = dir_rng.standard_normal((n_features, d_model)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1, sample_seed])
    writer = ActivationWriter(root, hook=hook, d_model=d_model, dtype=dtype, context_length=context_length,
                              corpus="synthetic", split=split)
    for i, start in enumerate(range(0, n_tokens, shard_rows)):
        n = min(shard_rows, n_tokens - start)
        rows = np.arange(start, start + n)
        # Generate in chunks to bound the [chunk, k, d_model] gather.
        acts = np.concatenate([synthetic_rows(min(4096, n - j), d_model, n_features, k_true, rng, directions)
                               for j in range(0, n, 4096)]) * scale
        writer.write_shard(i, rows // context_length, rows % context_length, np.zeros(n, np.int32), acts)
    return writer.finalize()


__all__ = ["synthetic_rows", "write_synthetic_activations"]
