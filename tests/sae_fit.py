"""One small training loop for tests that need a trained SAE: Adam, the trainer's step protocol."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fit(sae: torch.nn.Module, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]], steps: int,
        lr: float) -> torch.nn.Module:
    """Train ``sae`` for ``steps`` steps on ``batch(step) -> (x, target or None)`` (a target for transcoders) and
    return it in eval mode; the hooks around the optimizer step are the trainer's (pipeline/sae/base.py)."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for s in range(steps):
        x, target = batch(s)
        out = sae.training_loss(x, s, steps) if target is None else sae.training_loss(x, s, steps, target=target)
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return sae.eval()
