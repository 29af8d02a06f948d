"""SAE evaluation on held-out activations, streaming: reconstruction, sparsity, feature density.

Metric definitions live in :mod:`pipeline.metrics` (versioned names such as ``fvu@2``); this module
only streams batches through the SAE into those accumulators, so any dataset size fits in memory.
The downstream (spliced-model) metrics are in :mod:`pipeline.splice`.

Given ``special_ids`` (the stage passes the tokenizer's BOS/EOS/PAD ids when
``evaluate.exclude_special_tokens`` is on), rows whose ``token_id`` is special are left out of every
metric and of the density histogram, and the metrics carry their special-excluded names (``fvu@3``,
``l0@2``, ...); the all-token :data:`pipeline.metrics.ALL_TOKEN_REFERENCE` values come alongside.

A transcoder (``target``: the MLP-output dataset of the MLP-input ``dataset``, :mod:`pipeline.pairs`) is measured
against its target: the reconstruction metrics compare the MLP output with the prediction ``sae.predict(mlp_in)``
(same definitions and names, the reference being the target instead of the input); sparsity and density are of
its latents, as for an SAE.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metrics
from pipeline.activations import ActivationDataset
from pipeline.activations.reader import ActivationBatch
from pipeline.errors import UserError
from pipeline.pairs import check_aligned, check_rows
from pipeline.progress import Progress
from pipeline.sae import SAE

# Feature-density histogram: fixed log10(firing frequency) bin edges so runs are comparable.
DENSITY_EDGES = np.round(np.arange(-7.0, 0.0001, 0.25), 2)  # 28 bins from 1e-7 to 1


@dataclass
class ReconstructionPass:
    """Accumulators of one pass. ``recon``/``firing`` see the rows that count: every row, or the
    non-special ones when special ids were given; then ``recon_all``/``firing_all`` see every row."""

    recon: metrics.ReconstructionAccumulator
    firing: metrics.FiringAccumulator
    recon_all: metrics.ReconstructionAccumulator | None = None
    firing_all: metrics.FiringAccumulator | None = None

    @property
    def n_special(self) -> int:
        """Rows excluded as special tokens."""
        return self.firing_all.n - self.firing.n if self.firing_all is not None else 0

    def result(self) -> dict[str, float]:
        """Versioned metrics + ``n_tokens`` (rows they average over) [+ ``n_special_tokens``]."""
        out = {**self.recon.result(), **self.firing.result()}
        if self.recon_all is None or self.firing_all is None:
            return {**out, "n_tokens": self.firing.n}
        every = {**self.recon_all.result(), **self.firing_all.result()}
        return {**metrics.excluding_special(out), "n_tokens": self.firing.n, "n_special_tokens": self.n_special,
                **{k: every[k] for k in metrics.ALL_TOKEN_REFERENCE if k in every}}


@torch.no_grad()
def _storage_order(dataset: ActivationDataset, target: ActivationDataset | None, batch_size: int,
                   device: torch.device) -> Iterator[tuple[ActivationBatch, torch.Tensor]]:
    """(batch, reference ``[B, d_model]``) in storage order: the batch's own rows, or the target's rows of it."""
    batches = dataset.iter_batches(batch_size, shuffle=False, device=device, dtype=torch.float32)
    if target is None:
        yield from ((b, b.acts) for b in batches)
        return
    check_aligned(dataset, target)
    targets = target.iter_batches(batch_size, shuffle=False, device=device, dtype=torch.float32)
    for b, t in zip(batches, targets, strict=True):
        check_rows(b, t, dataset.root, target.root)
        yield b, t.acts


def reconstruction_pass(sae: SAE, dataset: ActivationDataset, n_tokens: int | None = None, batch_size: int = 4096,
                        device: str | torch.device = "cpu", special_ids: Collection[int] = (),
                        progress: Progress | None = None, target: ActivationDataset | None = None
                        ) -> ReconstructionPass:
    """Stream the first ``n_tokens`` rows (all if None; special rows count towards the limit) of
    ``dataset`` in storage order through ``sae``; rows whose token id is in ``special_ids`` are excluded.
    ``progress`` counts the rows read. A transcoder's ``target`` (aligned with ``dataset``) is what its
    prediction is compared with."""
    device = torch.device(device)
    was_training = sae.training
    sae.eval()
    out = ReconstructionPass(metrics.ReconstructionAccumulator(dataset.d_model, device),
                             metrics.FiringAccumulator(sae.cfg.d_sae, device))
    if special_ids:
        out.recon_all = metrics.ReconstructionAccumulator(dataset.d_model, device)
        out.firing_all = metrics.FiringAccumulator(sae.cfg.d_sae, device)
    seen = 0
    limit = n_tokens if n_tokens is not None else dataset.n_tokens
    for batch, ref in _storage_order(dataset, target, batch_size, device):
        inputs = batch.acts[: limit - seen]  # [B, d_model]
        f = sae.encode(inputs)  # [B, d_sae]
        x_hat = sae.decode(f)  # [B, d_model]
        x = ref[: limit - seen]  # [B, d_model]: what x_hat should be (the input, or a transcoder's target)
        if target is not None:
            x_hat = x_hat + sae.skip_out(inputs)  # type: ignore[attr-defined]  (a transcoder's skip term)
        seen += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
        if out.recon_all is not None and out.firing_all is not None:
            out.recon_all.update(x, x_hat)
            out.firing_all.update(f)
            keep = ~metrics.special_mask(batch.token_id[: x.shape[0]], special_ids)  # [B]
            x, x_hat, f = x[keep], x_hat[keep], f[keep]
        out.recon.update(x, x_hat)
        out.firing.update(f)
        if seen >= limit:
            break
    sae.train(was_training)
    if special_ids and out.firing.n == 0 and out.n_special > 0:
        raise UserError(f"{dataset.root}: all {out.n_special} rows read have a special token id "
                        f"({sorted(special_ids)}); were the activations written without token ids? "
                        "Set evaluate.exclude_special_tokens: false to evaluate them anyway")
    return out


def reconstruction_metrics(sae: SAE, dataset: ActivationDataset, n_tokens: int | None = None, batch_size: int = 4096,
                           device: str | torch.device = "cpu", special_ids: Collection[int] = (),
                           target: ActivationDataset | None = None) -> dict[str, float]:
    """``mse@1, uncentered_nmse@1, fvu@2, shrinkage@1, l0@1, l1@1, dead_fraction@1, dense_fraction@1`` + ``n_tokens``
    (with ``special_ids``: their special-excluded versions, ``n_special_tokens`` and the all-token reference;
    with a transcoder's ``target``: measured against it)."""
    return reconstruction_pass(sae, dataset, n_tokens, batch_size, device, special_ids, target=target).result()


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
                            device: str | torch.device, special_ids: Collection[int] = (),
                            progress: Progress | None = None, target: ActivationDataset | None = None
                            ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Reconstruction/sparsity metrics and the feature-density histogram (of the rows that count) of one SAE
    (or transcoder, against its ``target``)."""
    p = reconstruction_pass(sae, dataset, n_tokens, batch_size, device, special_ids, progress, target)
    return p.result(), density_histogram(p.firing.frequencies())


def write_density_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    from pipeline.io import atomic_write_text

    lines = ["log10_frequency,n_latents"] + [f"{r['log10_frequency']:.2f},{r['n_latents']}" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


__all__ = ["ReconstructionPass", "reconstruction_metrics", "reconstruction_pass", "evaluate_reconstruction", "density_histogram",
           "write_density_csv", "DENSITY_EDGES"]
