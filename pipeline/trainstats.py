"""On-device statistics of the training loop (running means between log rows, dead/dense latents) and the curve file.

Everything here stays on the training device and is only read back (one host sync) when the loop
logs, so a step never waits for the GPU. Both classes have ``state_dict``/``load_state_dict`` so
a checkpoint holds them and a resumed run logs exactly what an uninterrupted one would.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.io import atomic_write_text
from pipeline.metric_names import DENSE_THRESHOLD
from pipeline.sae import batch

# The training curve (plots/train/<hook>.csv): one row per log interval.
CURVE_COLUMNS = ("step", "tokens", "loss", "l0", "fvu", "dead_fraction", "dense_fraction", "lr")
# Final training-curve values in the summary, named by definition (see pipeline.trainstats): the
# curve's FVU is centred on each batch's mean, dead/dense fractions use the token window.
SUMMARY_NAMES = {"loss": "loss", "l0": "l0@1", "fvu": "fvu_batch@1", "dead_fraction": "dead_fraction_window@1",
                 "dense_fraction": "dense_fraction_window@1"}


def write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class RunningStats:
    """Sums over the steps since the last log row: loss, L0, residual and total variance, tokens."""

    KEYS = ("loss", "l0", "resid", "var", "steps")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, loss: Tensor, x: Tensor, x_hat: Tensor, l0: Tensor) -> None:
        """``x, x_hat`` [B, d_model]; ``l0`` scalar mean active latents per token; ``loss`` scalar. No host sync.

        Data-parallel (inside ``pipeline.sae.batch.across``): ``x, x_hat`` are this process's rows, ``loss`` and
        ``l0`` already global; the sums below are taken over the global batch, so every process holds the same."""
        x = x.float()
        err = x - x_hat.float()
        # FVU numerator and denominator summed over the interval, divided once at log time: the
        # ratio of sums is the interval's FVU, the mean of per-step ratios would not be.
        resid_var = batch.total(torch.stack([err.pow(2).sum(), (x - batch.mean(x)).pow(2).sum()]))
        vals = torch.stack([
            loss.detach().float(),
            l0.float(),
            resid_var[0],
            resid_var[1],
            torch.ones((), device=x.device),
        ]).double()
        self.sums += vals

    @torch.no_grad()
    def update_later(self, loss: Tensor, x: Tensor, x_hat: Tensor, l0: Tensor,
                     counts: Tensor) -> Callable[[], Tensor]:
        """:meth:`update` with the step's firing ``counts [d_sae]`` (int), the global ones returned by the function
        this returns, which adds the step to the sums when called.

        One process: :meth:`update` at once, the same ops. Data-parallel (inside ``batch.across``): the counts,
        ``l0`` and both FVU sums of this process's rows travel in ONE all-reduce started now (before backward) and
        waited for by the returned function (after the optimizer step), so it overlaps backward: the total
        variance from each process's row sum and sum of squares about its own mean (float64; ``batch.moments``)
        instead of a second collective for the global mean first.
        """
        if batch.world() == 1:
            self.update(loss, x, x_hat, l0)
            return lambda: counts
        x64 = x.detach().double()
        s = x64.sum(0)  # [d]
        parts = [counts, l0.double().reshape(1), (x.float() - x_hat.float()).pow(2).sum().double().reshape(1), s,
                 (x64 - s / x.shape[0]).pow(2).sum().reshape(1), (s.pow(2).sum() / x.shape[0]).reshape(1)]
        pending = batch.totals_later(*parts)
        loss = loss.detach().float()
        n, world = batch.rows(x.shape[0]), batch.world()  # read now: the result is waited for outside ``across``

        def finish() -> Tensor:
            total_counts, l0_sum, resid, s_all, S, q = pending()
            var = S + q - s_all.pow(2).sum() / n  # n·Var = sum_r S_r + sum_r ||s_r||^2/n_r - ||sum_r s_r||^2/n
            self.sums += torch.cat([loss.double().reshape(1), (l0_sum / world).float().double(), resid,
                                    var.reshape(1), torch.ones(1, dtype=torch.float64, device=x.device)])
            return total_counts

        return finish

    def read_and_reset(self) -> dict[str, float]:
        """One host sync; means over the interval (NaN when no step was taken)."""
        loss, l0, resid, var, steps = self.sums.tolist()
        self.sums.zero_()
        if steps == 0:
            return {"loss": float("nan"), "l0": float("nan"), "fvu": float("nan")}
        return {"loss": loss / steps, "l0": l0 / steps, "fvu": resid / var if var > 0 else float("nan")}

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums.copy_(state["sums"])


class LatentTracker:
    """Dead latents (no firing in the last ``window_tokens`` tokens) and dense ones (>10% of a window).

    The trainer's one record of firing: the dead mask it reports is the one AuxK and resampling use
    (passed into ``SAE.training_loss`` / ``resample_dead``), and it is saved in the checkpoint.

    ``last_fired`` holds the training-token count at each latent's last firing, so "dead" is
    exact at any step, not only at window boundaries (the rule used for AuxK in Gao et al. 2024,
    sec. A.2, and for resampling in Bricken et al. 2023). Density is counted over consecutive
    windows; before the first window completes, the partial window is reported.
    """

    def __init__(self, d_sae: int, window_tokens: int, device: torch.device):
        self.window_tokens = window_tokens
        self.tokens = 0  # host int: counts are deterministic, no sync needed
        self.window_start = 0
        self.last_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.window_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.last_density: Tensor | None = None  # [d_sae] firing frequency in the last complete window

    @torch.no_grad()
    def update(self, counts: Tensor, n_tokens: int) -> None:
        """``counts`` [d_sae] int: on how many of this step's ``n_tokens`` tokens each latent fired."""
        self.tokens += n_tokens
        self.last_fired = torch.where(counts > 0, self.tokens, self.last_fired)
        self.window_counts += counts
        if self.tokens - self.window_start >= self.window_tokens:
            self.last_density = self.window_counts.double() / (self.tokens - self.window_start)
            self.window_counts.zero_()
            self.window_start = self.tokens

    @torch.no_grad()
    def revive(self, idx: Tensor) -> None:
        """Latents ``idx`` (int64 indices) count as having just fired: a resampled latent starts a fresh window."""
        self.last_fired[idx] = self.tokens

    def dead_mask(self) -> Tensor:
        """[d_sae] bool, on device: latents silent for at least ``window_tokens`` tokens."""
        return (self.tokens - self.last_fired) >= self.window_tokens

    def density(self) -> Tensor:
        if self.last_density is not None:
            return self.last_density
        return self.window_counts.double() / max(1, self.tokens - self.window_start)

    def fractions(self) -> dict[str, float]:
        """Host sync: fraction of dead and of dense latents."""
        dead = self.dead_mask().double().mean()
        dense = (self.density() > DENSE_THRESHOLD).double().mean()
        dead_f, dense_f = torch.stack([dead, dense]).tolist()
        return {"dead_fraction": dead_f, "dense_fraction": dense_f}

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "window_start": self.window_start, "last_fired": self.last_fired.cpu(),
                "window_counts": self.window_counts.cpu(),
                "last_density": None if self.last_density is None else self.last_density.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens = int(state["tokens"])
        self.window_start = int(state["window_start"])
        self.last_fired.copy_(state["last_fired"])
        self.window_counts.copy_(state["window_counts"])
        dens = state["last_density"]
        self.last_density = None if dens is None else dens.to(self.last_fired.device)


__all__ = ["RunningStats", "LatentTracker", "DENSE_THRESHOLD", "CURVE_COLUMNS", "SUMMARY_NAMES", "write_curve"]
