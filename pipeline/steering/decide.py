"""From the likelihood grids to matched-cost comparisons, intervals, Holm-corrected verdicts and sentences.

Steering: every method's per-text effect is read at each KL budget of ``steer.kl_budgets``
(:func:`pipeline.steering.likelihood.at_budget`: one interpolated coefficient per concept and method),
so methods are compared at equal damage to the next-token distribution. The verdict compares, at
``steer.verdict_kl``, each SAE choice (``sae_input``, ``sae_output``) with frequency-matched random
latents, random directions and the difference in means; ablation compares the SAE latents' selectivity
(zero- and mean-ablation) with random latents and random directions. Each comparison is a paired
difference over (concept, unit) cells with a hierarchical bootstrap interval
(:mod:`pipeline.steering.hierarchical`); all comparisons form one Holm family. A comparison "beats" /
"loses to" only when its Holm-adjusted p-value is below 0.05, else it "is indistinguishable from".
Text values sit under keys ending in ``_text`` or ``verdict`` so numeric headlines can leave them out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from pipeline.steering.evidence import ABLATION_ARMS, STEER_ARMS, Evidence
from pipeline.steering.hierarchical import Estimate, HierResamples, estimate, holm
from pipeline.steering.likelihood import at_budget
from pipeline.steering.verdict import VERDICTS

__all__ = ["decide", "COMPARISONS", "ALPHA"]

ALPHA = 0.05  # family-wise error of the Holm-corrected verdicts
SAE_ARMS = ("sae_input", "sae_output")
COMPARISONS = ([("steer", s, b, "") for s in SAE_ARMS for b in ("random_latent", "random_direction", "dim")]
               + [("ablate", s, b, k) for s in SAE_ARMS for k in ("zero", "mean") for b in ("random_latent", "random_direction")])
_LABEL = {"sae_input": "input-chosen SAE latents", "sae_output": "output-chosen SAE latents",
          "random_latent": "frequency-matched random latents", "random_direction": "random directions",
          "dim": "difference-in-means directions"}


def _grid(rows: list[np.ndarray], width: int) -> np.ndarray:
    """Stack per-concept vectors of unequal length into [C, width], NaN-padded."""
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _fmt(e: Estimate | dict[str, float], sign: str = "+") -> str:
    d = e.as_dict() if isinstance(e, Estimate) else e
    if math.isnan(d["mean"]):
        return "n/a"
    ci = "no interval" if math.isnan(d["ci95_low"]) else f"95% CI [{d['ci95_low']:{sign}.3f}, {d['ci95_high']:{sign}.3f}]"
    return f"{d['mean']:{sign}.3f} ({ci})"


def _anti(values: np.ndarray) -> float:
    ok = np.isfinite(values)
    return float((values[ok] < 0).mean()) if ok.any() else math.nan


def decide(ev: Evidence, kl_budgets: list[float], verdict_kl: float, seed: int, n_resamples: int,
           decode: Callable[[list[int]], str] | None = None) -> tuple[dict[str, Any], pl.DataFrame, pl.DataFrame]:
    """The ``likelihood`` block of ``metrics/steer.json`` and the per-unit tables (steering, ablation)."""
    cs = ev.concepts
    if not cs:
        return {"verdict_text": "no concept could be evaluated: " + "; ".join(ev.notes)}, pl.DataFrame(), pl.DataFrame()
    C, U = len(cs), cs[0].effect.shape[2]
    W = max(c.ablation.shape[1] for c in cs)
    rs_s = HierResamples.draw(C, U, n_resamples, seed)
    rs_a = HierResamples.draw(C, max(W, 1), n_resamples, seed)
    # at[budget][arm]: per-(concept, text) effect at that KL budget, [C, U]; dl the loss change there
    at = {b: {m: np.stack([at_budget(c.kl[i].mean(1), c.effect[i], b) for c in cs]) for i, m in enumerate(STEER_ARMS)}
          for b in kl_budgets}
    dl = {m: np.stack([at_budget(c.kl[i].mean(1), c.dloss[i], verdict_kl) for c in cs]) for i, m in enumerate(STEER_ARMS)}
    sel = {a: _grid([c.ablation[j] for c in cs], max(W, 1)) for j, a in enumerate(ABLATION_ARMS)}
    by_budget = [{"kl": b, "lik_effect@1": {m: estimate(at[b][m], rs_s).as_dict() for m in STEER_ARMS},
                  "reached": {m: int(np.isfinite(at[b][m]).any(1).sum()) for m in STEER_ARMS}} for b in kl_budgets]
    v = at[verdict_kl]
    methods = {m: {"lik_effect@1": estimate(v[m], rs_s).as_dict(), "anti_steered@1": _anti(v[m]),
                   "lik_dloss@1": float(np.nanmean(dl[m])) if np.isfinite(dl[m]).any() else math.nan,
                   "concepts_reaching_budget": int(np.isfinite(v[m]).any(1).sum())} for m in STEER_ARMS}
    ablation = {a: {"abl_selectivity@1": estimate(sel[a], rs_a).as_dict(),
                    "abl_dloss@1": float(np.nanmean([np.nanmean(c.ablation_dloss[j]) for c in cs if c.ablation_dloss.shape[1]]))
                    if W else math.nan} for j, a in enumerate(ABLATION_ARMS)}
    comps: dict[str, dict[str, Any]] = {}
    for kind, s, b, k in COMPARISONS:
        diff = v[s] - v[b] if kind == "steer" else sel[f"{s}:{k}"] - sel[f"{b}:{k}"]
        e = estimate(diff, rs_s if kind == "steer" else rs_a)
        name = f"{s}_vs_{b}" if kind == "steer" else f"ablate_{k}_{s}_vs_{b}"
        comps[name] = {"metric": "lik_effect@1" if kind == "steer" else "abl_selectivity@1", **e.as_dict(),
                       "cells": int(np.isfinite(diff).sum())}
    adj = holm([d["p"] for d in comps.values()])
    for d, pa in zip(comps.values(), adj, strict=True):
        d["p_holm"] = pa
        sig = not math.isnan(pa) and pa < ALPHA
        d["verdict"] = VERDICTS[0] if sig and d["mean"] > 0 else VERDICTS[1] if sig and d["mean"] < 0 else VERDICTS[2]
    concepts = {c.concept: _concept(c, i, at[verdict_kl], sel, n_resamples, seed, decode) for i, c in enumerate(cs)}
    out = {"verdict_text": _sentence(comps, methods, ablation, verdict_kl, C, U, W),
           "verdict_kl": verdict_kl, "n_concepts": C, "n_test_texts": U, "n_ablation_windows": W,
           "hidden_norm": ev.hidden_norm, "coefficients": ev.coefficients,
           "comparisons": comps, "methods": methods, "ablation": ablation, "by_budget": by_budget, "concepts": concepts,
           "bootstrap": {"scheme": "hierarchical: concepts, then units within each concept; paired differences; "
                                   "Holm across all comparisons", "resamples": n_resamples, "seed": seed, "alpha": ALPHA}}
    if ev.notes:
        out["notes_text"] = "; ".join(ev.notes)
    return out, _steer_table(ev), _ablation_table(ev)


def _concept(c: Any, i: int, v: dict[str, np.ndarray], sel: dict[str, np.ndarray], n: int, seed: int,
             decode: Callable[[list[int]], str] | None) -> dict[str, Any]:
    rs = HierResamples.draw(1, v["sae_input"].shape[1], n, seed)
    rs_a = HierResamples.draw(1, next(iter(sel.values())).shape[1], n, seed)
    steer = {m: {**estimate(v[m][i:i + 1], rs).as_dict(), "anti_steered@1": _anti(v[m][i])} for m in STEER_ARMS}
    d = {f"{s}_vs_{b}": estimate(v[s][i:i + 1] - v[b][i:i + 1], rs).as_dict()
         for s in SAE_ARMS for b in ("random_latent", "dim")}
    abl = {a: estimate(sel[a][i:i + 1], rs_a).as_dict() for a in ABLATION_ARMS}
    e = d["sae_input_vs_random_latent"]
    txt = f"steering vs random latents {_fmt(e)}; vs dim {_fmt(d['sae_input_vs_dim'])}"
    a = estimate(sel["sae_input:zero"][i:i + 1] - sel["random_latent:zero"][i:i + 1], rs_a)
    txt += f"; zero-ablation selectivity vs random latents {_fmt(a)}"
    out = {"latents": dict(c.latents), "lexicon_size": len(c.lexicon), "steering": steer, "differences": d,
           "ablation": abl, "ablate_zero_sae_input_vs_random_latent": a.as_dict(), "output_scores": {str(k): s for k, s in c.output_scores.items()},
           "summary_text": txt}
    if decode is not None:
        out["lexicon_text"] = " | ".join(decode([t]) for t in c.lexicon[:12])
    return out


def _sentence(comps: dict[str, dict[str, Any]], methods: dict[str, Any], ablation: dict[str, Any], b: float,
              C: int, U: int, W: int) -> str:
    def clause(name: str, what: str) -> str:
        d = comps[name]
        return f"{d['verdict']} {what} (difference {_fmt(d)}, Holm p {d['p_holm']:.3g})"
    parts = [f"Likelihood evidence over {C} concepts x {U} held-out neutral texts, at KL {b:g} nats: "
             f"adding input-chosen SAE latents changes the concept lexicon's log-mass by "
             f"{_fmt(methods['sae_input']['lik_effect@1'])} nats (anti-steered on "
             f"{methods['sae_input']['anti_steered@1']:.0%} of texts); it "
             + "; ".join(clause(f"sae_input_vs_{x}", _LABEL[x]) for x in ("random_latent", "random_direction", "dim"))]
    parts.append("output-chosen SAE latents " + _fmt(methods["sae_output"]["lik_effect@1"]) + " nats: "
                 + "; ".join(clause(f"sae_output_vs_{x}", _LABEL[x]) for x in ("random_latent", "random_direction", "dim")))
    if W:
        parts.append(f"Ablation on up to {W} held-out windows of each topic's documents, selectivity (lexicon minus "
                     f"other tokens' log-prob drop): zero-ablating input-chosen latents "
                     f"{_fmt(ablation['sae_input:zero']['abl_selectivity@1'])}, which "
                     + "; ".join(clause(f"ablate_zero_sae_input_vs_{x}", _LABEL[x]) for x in ("random_latent", "random_direction"))
                     + "; mean-ablation " + "; ".join(clause(f"ablate_mean_sae_input_vs_{x}", _LABEL[x])
                                                      for x in ("random_latent", "random_direction")))
    return ". ".join(parts)


def _steer_table(ev: Evidence) -> pl.DataFrame:
    rows = [{"concept": c.concept, "method": m, "coefficient": k, "text": u, "lik_effect@1": float(c.effect[i, j, u]),
             "lik_kl@1": float(c.kl[i, j, u]), "lik_dloss@1": float(c.dloss[i, j, u])}
            for c in ev.concepts for i, m in enumerate(STEER_ARMS) for j, k in enumerate(ev.coefficients)
            for u in range(c.effect.shape[2])]
    return pl.DataFrame(rows)


def _ablation_table(ev: Evidence) -> pl.DataFrame:
    rows = [{"concept": c.concept, "variant": a, "window": w, "abl_selectivity@1": float(c.ablation[j, w]),
             "abl_dloss@1": float(c.ablation_dloss[j, w])}
            for c in ev.concepts for j, a in enumerate(ABLATION_ARMS) for w in range(c.ablation.shape[1])]
    return pl.DataFrame(rows, schema={"concept": pl.Utf8, "variant": pl.Utf8, "window": pl.Int64,
                                      "abl_selectivity@1": pl.Float64, "abl_dloss@1": pl.Float64})
