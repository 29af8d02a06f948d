"""SAEBench's ``core`` numbers for one SAE: reconstruction, shrinkage, sparsity, density, weight geometry,
and the spliced model's CE and KL, over non-special tokens (SAEBench's
``exclude_special_tokens_from_reconstruction``). They fill the ``core`` result file every other
SAEBench result is plotted against (L0, CE loss score).

Differences from SAEBench's code, all deliberate: ``explained_variance`` is 1 - FVU over the whole
pass (SAEBench averages batch statistics); ``explained_variance_legacy`` is SAEBench's per-token
1 - residual / (batch variance) with the batch being one streamed batch; the zero-ablation baseline
keeps the special positions (as ``sae evaluate`` does).

A transcoder (:mod:`pipeline.site`) is measured as what it is, a replacement of its block's MLP: the reconstruction
numbers compare its prediction ``decode(encode(x)) + skip(x)`` of the MLP output with the MLP output (``x`` the MLP
input, the batches carrying the target), and the spliced model runs with the MLP output replaced by that prediction
from the MLP input of the same forward (the zero-ablation baseline zeroes the MLP output).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import torch
import torch.nn.functional as F

from pipeline.site import Site, edit_site


@torch.no_grad()
def reconstruction_stats(batches: Iterable[tuple[torch.Tensor, ...]], encode: Callable[[torch.Tensor], torch.Tensor],
                         decode: Callable[[torch.Tensor], torch.Tensor], d_sae: int, special_ids: Collection[int],
                         n_tokens: int, skip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Stream ``(acts[B, d], token_id[B])`` until ``n_tokens`` non-special rows; SAEBench core's
    reconstruction, shrinkage, sparsity and density values (keys as in its result file).

    A transcoder's batches are ``(acts, token_id, target[B, d])``: the prediction ``decode(f) + skip(acts)``
    (``skip`` None: no skip term) is compared with ``target`` instead of ``acts``."""
    special = torch.tensor(sorted(special_ids), dtype=torch.int64)
    s: dict[str, float] = dict.fromkeys(("n", "resid", "sumsq", "l2_in", "l2_out", "ratio", "xhat2", "xdot", "cos",
                                         "l0", "l1", "legacy"), 0.0)
    mean_acc: torch.Tensor | None = None
    fires = torch.zeros(d_sae, dtype=torch.float64)
    for acts, tok, *target in batches:
        keep = ~torch.isin(tok.to(torch.int64), special)
        inp = acts[keep].double()[: max(0, n_tokens - int(s["n"]))]
        if len(inp) == 0:
            if s["n"] >= n_tokens:
                break
            continue
        x = target[0][keep].double()[: len(inp)] if target else inp  # what is reconstructed
        f = encode(inp.float())  # [n, d_sae] float32: sums over d_sae stay float32, the d-sized ones float64
        xh = decode(f).double()
        if skip is not None:
            xh = xh + skip(inp.float()).double()
        r2 = (x - xh).pow(2).sum(-1)
        n_in, n_out = x.norm(dim=-1), xh.norm(dim=-1)
        s["n"] += len(x)
        s["resid"] += float(r2.sum())
        s["sumsq"] += float(x.pow(2).sum())
        mean_acc = x.sum(0) if mean_acc is None else mean_acc + x.sum(0)
        s["l2_in"] += float(n_in.sum())
        s["l2_out"] += float(n_out.sum())
        s["ratio"] += float((n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum())
        s["xhat2"] += float(n_out.pow(2).sum())
        s["xdot"] += float((x * xh).sum())
        s["cos"] += float(F.cosine_similarity(x, xh, dim=-1).sum())
        s["l0"] += float((f != 0).sum())
        s["l1"] += float(f.abs().sum(-1).double().sum())
        var = (x - x.mean(0)).pow(2).sum(-1)
        s["legacy"] += float((1 - r2 / var.clamp(min=1e-12)).sum())
        fires += (f > 0).sum(0).to(torch.float64)
    n = max(s["n"], 1.0)
    assert mean_acc is not None, "no non-special token to evaluate"
    total_var = s["sumsq"] - float(mean_acc.pow(2).sum()) / n
    density = fires / n
    total = float(density.sum())
    return {
        "explained_variance": 1 - s["resid"] / total_var, "explained_variance_legacy": s["legacy"] / n,
        "mse": s["resid"] / n / (len(mean_acc)), "cossim": s["cos"] / n,
        "l2_norm_in": s["l2_in"] / n, "l2_norm_out": s["l2_out"] / n, "l2_ratio": s["ratio"] / n,
        "relative_reconstruction_bias": s["xhat2"] / s["xdot"] if s["xdot"] else 0.0,
        "l0": s["l0"] / n, "l1": s["l1"] / n,
        "frac_alive": float((density > 0).double().mean()),
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total if total else 0.0,
        "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total if total else 0.0,
        "n_tokens": int(s["n"]),
    }


def max_cosine(W: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``W[n, d]`` rows -> ``[n]`` each row's largest cosine with another row."""
    U = F.normalize(W.float(), dim=-1)
    out = torch.empty(len(U))
    for s in range(0, len(U), chunk):
        sim = U[s:s + chunk] @ U.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -2.0
        out[s:s + chunk] = sim.max(-1).values
    return out


def _log_probs(model: torch.nn.Module, ids: torch.Tensor, hook: str | Site, where: torch.Tensor,
               edit: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Next-token log-probabilities ``[b, T-1, vocab]`` float32, the hook's output replaced by ``edit(h)`` at
    ``where`` ``[b, T, 1]`` (None: clean). At a transcoder's site the write hook's output is replaced by
    ``edit(x)``, ``x`` the read hook's state of the same forward."""
    if edit is None:
        return model(input_ids=ids, use_cache=False).logits.float()[:, :-1].log_softmax(-1)

    def replace(h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return torch.where(where, edit((h if x is None else x).float()).to(h.dtype), h)

    with edit_site(model, hook, replace):
        return model(input_ids=ids, use_cache=False).logits.float()[:, :-1].log_softmax(-1)


@torch.no_grad()
def splice_kl_ce(model: torch.nn.Module, hook: str | Site, reconstruct: Callable[[torch.Tensor], torch.Tensor],
                 contexts: torch.Tensor, special_ids: Collection[int], batch_size: int = 8) -> dict[str, float]:
    """CE without / with the SAE / with zero ablation and KL(clean || edited) of both edits, over the
    predictions made at non-special positions; edits only at non-special positions. ``contexts [N, T]``.
    ``hook``: a transcoder's :class:`~pipeline.site.Site`, ``reconstruct`` its ``predict`` of the MLP input."""
    special = torch.tensor(sorted(special_ids), dtype=torch.int64)
    sums = dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "n"), 0.0)
    for start in range(0, len(contexts), batch_size):
        ids = contexts[start:start + batch_size]
        where = ~torch.isin(ids.cpu(), special).to(ids.device)[..., None]  # [b, T, 1]
        keep = where[:, :-1, 0]  # predictions made at non-special positions
        clean = _log_probs(model, ids, hook, where, None)
        target = ids[:, 1:]
        for name, edit in (("clean", None), ("sae", reconstruct), ("zero", torch.zeros_like)):
            lp = clean if edit is None else _log_probs(model, ids, hook, where, edit)
            ce = -lp.gather(-1, target[..., None])[..., 0]
            sums[f"ce_{name}"] += float(ce[keep].sum())
            if edit is not None:
                sums[f"kl_{name}"] += float((clean.exp() * (clean - lp)).sum(-1)[keep].sum())
        sums["n"] += float(keep.sum())
    n = max(sums["n"], 1.0)
    m = {k: v / n for k, v in sums.items() if k != "n"}
    return {
        "ce_loss_without_sae": m["ce_clean"], "ce_loss_with_sae": m["ce_sae"], "ce_loss_with_ablation": m["ce_zero"],
        "ce_loss_score": (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"]),
        "kl_div_with_sae": m["kl_sae"], "kl_div_with_ablation": m["kl_zero"],
        "kl_div_score": (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] else 0.0,
        "n_predictions": int(sums["n"]),
    }


__all__ = ["reconstruction_stats", "max_cosine", "splice_kl_ce"]
