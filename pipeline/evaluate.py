"""SAE evaluation on held-out activations, streaming: reconstruction, sparsity, feature density.

Metric definitions live in :mod:`pipeline.metrics` (versioned names such as ``fvu@2``); this module
only streams batches through the SAE into those accumulators, so any dataset size fits in memory.
The downstream (spliced-model) metrics are in :mod:`pipeline.splice`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metrics
from pipeline.activations import ActivationDataset
from pipeline.sae import SAE

# Feature-density histogram: fixed log10(firing frequency) bin edges so runs are comparable.
DENSITY_EDGES = np.round(np.arange(-7.0, 0.0001, 0.25), 2)  # 28 bins from 1e-7 to 1


@torch.no_grad()
def reconstruction_pass(sae: SAE, dataset: ActivationDataset, n_tokens: int | None = None, batch_size: int = 4096,
                        device: str | torch.device = "cpu"
                        ) -> tuple[metrics.ReconstructionAccumulator, metrics.FiringAccumulator]:
    """Stream the first ``n_tokens`` (all if None) of ``dataset`` in storage order through ``sae``."""
    device = torch.device(device)
    was_training = sae.training
    sae.eval()
    recon = metrics.ReconstructionAccumulator(dataset.d_model, device)
    firing = metrics.FiringAccumulator(sae.cfg.d_sae, device)
    seen = 0
    limit = n_tokens if n_tokens is not None else dataset.n_tokens
    for batch in dataset.iter_batches(batch_size, shuffle=False, device=device, dtype=torch.float32):
        x = batch.acts[: limit - seen]  # [B, d_model]
        f = sae.encode(x)  # [B, d_sae]
        x_hat = sae.decode(f)  # [B, d_model]
        recon.update(x, x_hat)
        firing.update(f)
        seen += x.shape[0]
        if seen >= limit:
            break
    sae.train(was_training)
    return recon, firing


def reconstruction_metrics(sae: SAE, dataset: ActivationDataset, n_tokens: int | None = None, batch_size: int = 4096,
                           device: str | torch.device = "cpu") -> dict[str, float]:
    """``mse@1, nmse@1, fvu@2, shrinkage@1, l0@1, l1@1, dead_fraction@1, dense_fraction@1`` + ``n_tokens``."""
    recon, firing = reconstruction_pass(sae, dataset, n_tokens, batch_size, device)
    return {**recon.result(), **firing.result(), "n_tokens": firing.n}


def density_histogram(frequencies: torch.Tensor) -> list[dict[str, Any]]:
    """Rows ``{log10_frequency, n_latents}`` (bin left edge; frequencies below 1e-7 go to the first bin).

    Dead latents (frequency 0) have no logarithm; they are counted by ``dead_fraction@1`` instead.
    """
    freq = frequencies.double().cpu().numpy()
    alive = freq[freq > 0]
    logf = np.clip(np.log10(alive), DENSITY_EDGES[0], 0.0)
    counts, _ = np.histogram(logf, bins=DENSITY_EDGES)
    return [{"log10_frequency": float(e), "n_latents": int(c)} for e, c in zip(DENSITY_EDGES[:-1], counts, strict=True)]


def evaluate_reconstruction(sae: SAE, dataset: ActivationDataset, n_tokens: int | None, batch_size: int,
                            device: str | torch.device) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Reconstruction/sparsity metrics and the feature-density histogram of one SAE."""
    recon, firing = reconstruction_pass(sae, dataset, n_tokens, batch_size, device)
    out = {**recon.result(), **firing.result(), "n_tokens": firing.n}
    return out, density_histogram(firing.frequencies())


def write_density_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    from pipeline.io import atomic_write_text

    lines = ["log10_frequency,n_latents"] + [f"{r['log10_frequency']:.2f},{r['n_latents']}" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def finite_or_none(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: undefined metrics (e.g. CE recovered when ablation costs nothing) become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


__all__ = ["reconstruction_metrics", "reconstruction_pass", "evaluate_reconstruction", "density_histogram",
           "write_density_csv", "finite_or_none", "DENSITY_EDGES"]
