"""Downstream metrics: the subject model's next-token loss with the SAE spliced into its forward pass.

For each batch of token contexts ``ids [b, T]`` three forwards run: clean, with the hook's output
``h [b, T, d_model]`` replaced by the SAE's reconstruction, and with ``h`` replaced by zeros
(the ablation baseline of "CE loss recovered", Bricken et al. 2023; Gao et al. 2024 §4.1).
Per-token losses go into :class:`pipeline.metrics.LMLossAccumulator`, which owns the versioned
definitions (ratios of token means). Predictions are scored at positions 0..T-2 against tokens 1..T-1.

Without ``special_ids`` every position is spliced and zeroed, BOS included, and every prediction
counts (``ce_loss_recovered@1``, ``kl_div@1``, ...). With them (``evaluate.exclude_special_tokens``,
as SAEBench's core evaluation does) the positions holding a special token keep their original
activation in both edited forwards, and predictions made at those positions are not averaged
(``ce_loss_recovered@2``, ``kl_div@2``, ...); two more forwards per batch (skipped when a batch
has no special token) give the all-token ``ce_loss_recovered@1`` and ``kl_div@1`` alongside.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import metrics
from pipeline.errors import UserError
from pipeline.hooks import intervene
from pipeline.progress import Progress

Reconstruct = Callable[[Tensor], Tensor]  # h [..., d_model] -> h_hat [..., d_model]


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    """``ids [b, T]`` -> float32 logits ``[b, T, vocab]``."""
    return model(input_ids=ids).logits.float()


def _ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-prediction next-token cross-entropy (nats) ``[b, T-1]`` of ``logits [b, T, V]`` on ``ids [b, T]``."""
    b, T, V = logits.shape
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(b, T - 1)


def _edited(model: nn.Module, hook: str, ids: Tensor, clean: Tensor, splice: Reconstruct, zero: Reconstruct
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-prediction ``[b, T-1]``: CE with the hook's output edited by ``splice``, by ``zero``, and
    KL(clean || spliced) of the next-token distributions, given the clean logits ``[b, T, vocab]``."""
    with intervene(model, hook, splice):
        spliced = _logits(model, ids)
    with intervene(model, hook, zero):
        ablated = _logits(model, ids)
    # KL at the scored positions 0..T-2, one context at a time: float64 [T, vocab] is the peak.
    kl = torch.stack([metrics.kl_div_per_token(c[:-1], s[:-1]) for c, s in zip(clean, spliced, strict=True)])  # [b, T-1]
    return _ce(spliced, ids), _ce(ablated, ids), kl


def _only_at(where: Tensor, edit: Reconstruct) -> Reconstruct:
    """``edit`` where ``where [b, T, 1]`` is True; elsewhere the hook's output is left as it was."""
    return lambda h: torch.where(where, edit(h), h)


@torch.no_grad()
def splice_metrics(model: nn.Module, hook: str, reconstruct: Reconstruct, contexts: Tensor, batch_size: int,
                   special_ids: Collection[int] = (), progress: Progress | None = None) -> dict[str, float]:
    """``ce_loss_recovered@1``, ``kl_div@1``, ``delta_lm_loss@1`` (+ clean/SAE/zero-ablation CE) over
    ``contexts [N, T]`` (int64 token ids on the model's device), ``batch_size`` contexts per forward.
    With ``special_ids``: their ``@2`` versions (special positions neither edited nor counted) plus
    the all-token :data:`pipeline.metrics.ALL_TOKEN_REFERENCE` values. ``progress`` counts the contexts run."""

    def splice(h: Tensor) -> Tensor:  # h [b, T, d_model] in the model's dtype
        return reconstruct(h.float()).to(h.dtype)

    def zero(h: Tensor) -> Tensor:
        return torch.zeros_like(h)

    acc = metrics.LMLossAccumulator()  # the positions that count
    every = metrics.LMLossAccumulator() if special_ids else None  # all positions (reference)
    for start in range(0, contexts.shape[0], batch_size):
        ids = contexts[start:start + batch_size]  # [b, T]
        clean = _logits(model, ids)
        ce_clean = _ce(clean, ids)  # [b, T-1]
        if every is None:
            ce_sae, ce_zero, kl = _edited(model, hook, ids, clean, splice, zero)
            acc.update(ce_clean, ce_sae, ce_zero, kl)
            if progress is not None:
                progress.update(ids.shape[0])
            continue
        special = metrics.special_mask(ids, special_ids)  # [b, T]
        where = ~special[..., None]  # [b, T, 1]: positions edited; the others keep the original activation
        ce_sae, ce_zero, kl = _edited(model, hook, ids, clean, _only_at(where, splice), _only_at(where, zero))
        keep = ~special[:, :-1]  # [b, T-1]: predictions made at non-special positions
        acc.update(ce_clean[keep], ce_sae[keep], ce_zero[keep], kl[keep])
        if special.any():  # else the masked edits above were the full ones
            ce_sae, ce_zero, kl = _edited(model, hook, ids, clean, splice, zero)
        every.update(ce_clean, ce_sae, ce_zero, kl)
        if progress is not None:
            progress.update(ids.shape[0])
    if every is None:
        return acc.result()
    ref = every.result()
    return {**metrics.excluding_special(acc.result()), **{k: ref[k] for k in metrics.ALL_TOKEN_REFERENCE if k in ref}}


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
