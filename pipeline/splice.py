"""Downstream metrics: the subject model's next-token loss with the SAE spliced into its forward pass.

For each batch of token contexts ``ids [b, T]`` three forwards run: clean, with the hook's output
``h [b, T, d_model]`` replaced by the SAE's reconstruction, and with ``h`` replaced by zeros
(the ablation baseline of "CE loss recovered", Bricken et al. 2023; Gao et al. 2024 §4.1).
Per-token losses go into :class:`pipeline.metrics.LMLossAccumulator`, which owns the versioned
definitions (ratios of token means).

Every position is spliced, BOS included, because extraction records every position and the SAE
is trained on them; predictions are scored at positions 0..T-2 against tokens 1..T-1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import metrics
from pipeline.errors import UserError
from pipeline.hooks import intervene

Reconstruct = Callable[[Tensor], Tensor]  # h [..., d_model] -> h_hat [..., d_model]


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    """``ids [b, T]`` -> float32 logits ``[b, T, vocab]``."""
    return model(input_ids=ids).logits.float()


def _ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-prediction next-token cross-entropy (nats) ``[b, T-1]`` of ``logits [b, T, V]`` on ``ids [b, T]``."""
    b, T, V = logits.shape
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(b, T - 1)


@torch.no_grad()
def splice_metrics(model: nn.Module, hook: str, reconstruct: Reconstruct, contexts: Tensor, batch_size: int
                   ) -> dict[str, float]:
    """``ce_loss_recovered@1``, ``kl_div@1``, ``delta_lm_loss@1`` (+ clean/SAE/zero-ablation CE) over
    ``contexts [N, T]`` (int64 token ids on the model's device), ``batch_size`` contexts per forward."""

    def splice(h: Tensor) -> Tensor:  # h [b, T, d_model] in the model's dtype
        return reconstruct(h.float()).to(h.dtype)

    def zero(h: Tensor) -> Tensor:
        return torch.zeros_like(h)

    acc = metrics.LMLossAccumulator()
    for start in range(0, contexts.shape[0], batch_size):
        ids = contexts[start:start + batch_size]  # [b, T]
        clean = _logits(model, ids)
        with intervene(model, hook, splice):
            spliced = _logits(model, ids)
        with intervene(model, hook, zero):
            ablated = _logits(model, ids)
        # KL at the scored positions 0..T-2, one context at a time: float64 [T, vocab] is the peak.
        kl = torch.stack([metrics.kl_div_per_token(c[:-1], s[:-1]) for c, s in zip(clean, spliced, strict=True)])  # [b, T-1]
        acc.update(_ce(clean, ids), _ce(spliced, ids), _ce(ablated, ids), kl)
    return acc.result()


def validation_contexts(path: str | Path, n: int, split: str = "validation") -> Tensor:
    """The first ``n`` contexts (by ``context_id``) of ``split`` in a contexts Parquet: ``[n', T]`` int64."""
    import numpy as np

    from pipeline.tokens import read_contexts

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: token contexts not found (run `sae prepare` first)")
    df = read_contexts(path, split=split).sort("context_id").head(n)
    if df.height == 0:
        raise UserError(f"{path}: no {split!r} contexts to splice the SAE into (set evaluate.n_splice_contexts: 0 to skip)")
    return torch.from_numpy(np.array(df["token_ids"].to_list(), dtype=np.int64))


__all__ = ["splice_metrics", "validation_contexts"]
