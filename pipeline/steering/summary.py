"""From raw generation rows to the protocol's verdict: fluency, coefficient choice, test scores, baselines.

Protocol (AxBench-like, Wu et al. 2025): for each feature and method the coefficient with the highest
mean ``hm@2`` over *validation* prompts is chosen; the numbers reported are the means over *test*
prompts at that coefficient, so the choice never sees the prompts it is judged on. The SAE method
(add or clamp) that the verdict speaks for is chosen on validation prompts too, and the verdict
against each baseline rests on a bootstrap interval of the paired test difference
(:mod:`pipeline.steering.verdict`). With the optional LLM judge (``judge``) its ratings are reported
at the same coefficients, next to the automatic scores, with a verdict of their own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from pipeline.params.analysis import BASELINES, SAE_METHODS
from pipeline.steering.bootstrap import LEVEL, Resamples
from pipeline.steering.metrics import fluency, harmonic_mean
from pipeline.steering.verdict import metric_verdict

__all__ = ["add_scores", "choose_and_report", "REPORTED", "JUDGED"]

REPORTED = ("hm@2", "concept@2", "fluency@2", "concept_act@2", "concept_frac@2", "topic_score@2",
            "perplexity@2", "distinct2@2", "kl@2", "other_features@2")
JUDGED = ("judge_hm", "judge_concept", "judge_instruction", "judge_fluency")  # only when steer.judge is on


def add_scores(df: pl.DataFrame) -> pl.DataFrame:
    """Add ``fluency@2`` (vs the same prompt's unsteered row), ``concept@2`` and ``hm@2``."""
    ref = (df.filter(pl.col("method") == "none")
             .select("feature", "prompt_id", pl.col("perplexity@2").alias("_ref")))
    df = df.join(ref, on=["feature", "prompt_id"], how="left")
    flu = fluency(df["perplexity@2"].to_numpy(), df["_ref"].to_numpy())
    topic = df["topic_score@2"].to_numpy()
    # Labelled corpora: the topic score (blind to the SAE, fair to baselines); else the feature itself.
    concept = np.where(np.isnan(topic), np.minimum(df["concept_act@2"].to_numpy(), 1.0), topic)
    concept = np.clip(concept, 0.0, 1.0)
    return df.drop("_ref").with_columns(
        pl.Series("fluency@2", flu), pl.Series("concept@2", concept),
        pl.Series("hm@2", harmonic_mean(concept, flu)),
    )


def _means(df: pl.DataFrame, keys: tuple[str, ...] = REPORTED) -> dict[str, float]:
    out = {}
    for k in keys:
        v = df[k].drop_nans().drop_nulls() if k in df.columns else pl.Series([], dtype=pl.Float64)
        out[k] = float(v.mean()) if len(v) else math.nan  # type: ignore[arg-type]
    return out


def choose_and_report(df: pl.DataFrame, seed: int = 0, n_resamples: int = 10_000) -> dict[str, Any]:
    """Per feature x method: chosen coefficient, validation and test means; per method; overall verdict.

    :param seed: seeds the bootstrap resamples; :param n_resamples: their number (``steer.bootstrap_resamples``)
    """
    per_feature: dict[str, Any] = {}
    per_method_rows: dict[str, list[dict[str, float]]] = {}
    chosen: list[pl.DataFrame] = []  # every split's rows at each (feature, method)'s chosen coefficient
    # Judge columns exist only when the judge ran: without it the report is exactly as before.
    keys = REPORTED + (JUDGED if "judge_hm" in df.columns else ())
    for f in sorted(df["feature"].unique().to_list()):
        fd = df.filter(pl.col("feature") == f)
        entry: dict[str, Any] = {"topic": fd["topic"][0], "methods": {}}
        none = fd.filter(pl.col("method") == "none")
        entry["unsteered"] = {"validation": _means(none.filter(pl.col("split") == "validation"), keys),
                              "test": _means(none.filter(pl.col("split") == "test"), keys)}
        for m in [m for m in fd["method"].unique(maintain_order=True).to_list() if m != "none"]:
            md = fd.filter(pl.col("method") == m)
            val = md.filter(pl.col("split") == "validation")
            by_c = val.group_by("coefficient").agg(pl.col("hm@2").mean()).sort("coefficient")
            # Highest validation hm@2; ties go to the smaller coefficient (the gentler intervention).
            best = max(zip(by_c["hm@2"].to_list(), by_c["coefficient"].to_list(), strict=True), key=lambda t: (t[0], -t[1]))[1]
            at_best = md.filter(pl.col("coefficient") == best)
            chosen.append(at_best)
            test = _means(at_best.filter(pl.col("split") == "test"), keys)
            entry["methods"][m] = {"coefficient": best,
                                   "validation": _means(val.filter(pl.col("coefficient") == best), keys), "test": test}
            per_method_rows.setdefault(m, []).append(test)
        per_feature[str(f)] = entry
    per_method = {m: {k: float(np.nanmean([r[k] for r in rs])) if any(not math.isnan(r[k]) for r in rs) else math.nan
                      for k in keys} for m, rs in per_method_rows.items()}
    at = pl.concat(chosen) if chosen else df.clear()
    overall = _overall(df, at, per_feature, per_method, seed, n_resamples)
    return {"features": per_feature, "methods": per_method, "overall": overall}


def _overall(df: pl.DataFrame, chosen: pl.DataFrame, per_feature: dict[str, Any], per_method: dict[str, dict[str, float]],
             seed: int, n_resamples: int) -> dict[str, Any]:
    """Does the SAE method chosen on validation beat each baseline on test hm@2 (and under the judge)?"""
    if not any(m in per_method for m in SAE_METHODS):
        return {"summary": "no SAE steering method was run"}
    features = sorted(df["feature"].unique().to_list())
    prompts = {s: sorted(df.filter(pl.col("split") == s)["prompt_id"].unique().to_list()) for s in ("validation", "test")}
    rs = Resamples.draw(len(prompts["test"]), len(features), n_resamples, seed)
    out, lines = metric_verdict(chosen, "hm@2", "", per_feature, rs, prompts, features)
    if not lines:
        return {"summary": "no SAE steering method has a validation hm@2"}
    sae = out["sae_method"]
    unsteered = float(np.nanmean([e["unsteered"]["test"]["concept@2"] for e in per_feature.values()]))
    out["unsteered_concept@2"] = unsteered
    out["sae_concept_gain@3"] = per_method[sae]["concept@2"] - unsteered
    for b in BASELINES:
        if b in per_method:
            out[f"sae_minus_{b}_concept@3"] = per_method[sae]["concept@2"] - per_method[b]["concept@2"]
    lines[0] += (f" (concept@2 {per_method[sae]['concept@2']:.3f} vs {unsteered:.3f} unsteered, "
                 f"fluency@2 {per_method[sae]['fluency@2']:.3f})")
    out["bootstrap"] = {"scheme": "two-way percentile bootstrap over (test prompt, feature) units (Owen 2007); "
                                  "differences paired on the same units",
                        "level": LEVEL, "resamples": n_resamples, "seed": seed,
                        "test_prompts": len(prompts["test"]), "features": len(features)}
    summary = "; ".join(lines)
    if "judge_hm" in chosen.columns:
        judged, jlines = metric_verdict(chosen, "judge_hm", "judge_", per_feature, rs, prompts, features)
        if jlines:
            out.update(judged)
            j = per_method[judged["judge_sae_method"]]
            unsteered_j = [e["unsteered"]["test"]["judge_hm"] for e in per_feature.values()]
            out["judge_unsteered_hm"] = float(np.nanmean(unsteered_j)) if any(not math.isnan(u) for u in unsteered_j) else math.nan
            jlines[0] = (f"LLM judge: {jlines[0]} (0-2 scale; concept {j['judge_concept']:.2f}, "
                         f"instruction {j['judge_instruction']:.2f}, fluency {j['judge_fluency']:.2f})")
            summary += ". " + "; ".join(jlines)
    out["summary"] = summary
    return out
