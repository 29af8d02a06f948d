"""From raw generation rows to the protocol's verdict: fluency, coefficient choice, test scores, baselines.

Protocol (AxBench-like, Wu et al. 2025): for each feature and method the coefficient with the highest
mean ``hm@1`` over *validation* prompts is chosen; the numbers reported are the means over *test*
prompts at that coefficient, so the choice never sees the prompts it is judged on. With the optional
LLM judge (``judge``) its ratings are reported at the same coefficients, next to the automatic scores.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from pipeline.steering.metrics import fluency, harmonic_mean

__all__ = ["add_scores", "choose_and_report", "REPORTED", "JUDGED", "SAE_METHODS", "BASELINES"]

SAE_METHODS = ("add", "clamp")
BASELINES = ("dim", "random")
REPORTED = ("hm@1", "concept@1", "fluency@1", "concept_act@1", "concept_frac@1", "topic_score@1",
            "perplexity@1", "distinct2@1", "kl@1", "other_features@1")
JUDGED = ("judge_hm", "judge_concept", "judge_instruction", "judge_fluency")  # only when steer.judge is on


def add_scores(df: pl.DataFrame) -> pl.DataFrame:
    """Add ``fluency@1`` (vs the same prompt's unsteered row), ``concept@1`` and ``hm@1``."""
    ref = (df.filter(pl.col("method") == "none")
             .select("feature", "prompt_id", pl.col("perplexity@1").alias("_ref")))
    df = df.join(ref, on=["feature", "prompt_id"], how="left")
    flu = fluency(df["perplexity@1"].to_numpy(), df["_ref"].to_numpy())
    topic = df["topic_score@1"].to_numpy()
    # Labelled corpora: the topic score (blind to the SAE, fair to baselines); else the feature itself.
    concept = np.where(np.isnan(topic), np.minimum(df["concept_act@1"].to_numpy(), 1.0), topic)
    concept = np.clip(concept, 0.0, 1.0)
    return df.drop("_ref").with_columns(
        pl.Series("fluency@1", flu), pl.Series("concept@1", concept),
        pl.Series("hm@1", harmonic_mean(concept, flu)),
    )


def _means(df: pl.DataFrame, keys: tuple[str, ...] = REPORTED) -> dict[str, float]:
    out = {}
    for k in keys:
        v = df[k].drop_nans().drop_nulls() if k in df.columns else pl.Series([], dtype=pl.Float64)
        out[k] = float(v.mean()) if len(v) else math.nan  # type: ignore[arg-type]
    return out


def choose_and_report(df: pl.DataFrame) -> dict[str, Any]:
    """Per feature x method: chosen coefficient, validation and test means; per method; overall verdict."""
    per_feature: dict[str, Any] = {}
    per_method_rows: dict[str, list[dict[str, float]]] = {}
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
            by_c = val.group_by("coefficient").agg(pl.col("hm@1").mean()).sort("coefficient")
            # Highest validation hm@1; ties go to the smaller coefficient (the gentler intervention).
            best = max(zip(by_c["hm@1"].to_list(), by_c["coefficient"].to_list(), strict=True), key=lambda t: (t[0], -t[1]))[1]
            test = _means(md.filter((pl.col("split") == "test") & (pl.col("coefficient") == best)), keys)
            entry["methods"][m] = {"coefficient": best,
                                   "validation": _means(val.filter(pl.col("coefficient") == best), keys), "test": test}
            per_method_rows.setdefault(m, []).append(test)
        per_feature[str(f)] = entry
    per_method = {m: {k: float(np.nanmean([r[k] for r in rs])) if any(not math.isnan(r[k]) for r in rs) else math.nan
                      for k in keys} for m, rs in per_method_rows.items()}
    overall = _verdict(per_feature, per_method)
    if "judge_hm" in df.columns:
        _judge_verdict(overall, per_feature, per_method)
    return {"features": per_feature, "methods": per_method, "overall": overall}


def _verdict(per_feature: dict[str, Any], per_method: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Does SAE steering beat each baseline on test hm@1 (and on concept@1)? With numbers."""
    sae = [m for m in SAE_METHODS if m in per_method]
    out: dict[str, Any] = {}
    if not sae:
        out["summary"] = "no SAE steering method was run"
        return out
    best = max(sae, key=lambda m: per_method[m]["hm@1"])
    out["best_sae_method"] = best
    out["sae_hm@1"] = per_method[best]["hm@1"]
    unsteered = float(np.nanmean([e["unsteered"]["test"]["concept@1"] for e in per_feature.values()]))
    out["unsteered_concept@1"] = unsteered
    out["sae_concept_gain@1"] = per_method[best]["concept@1"] - unsteered
    lines = [f"SAE '{best}' steering: test hm@1 {per_method[best]['hm@1']:.3f} "
             f"(concept@1 {per_method[best]['concept@1']:.3f} vs {unsteered:.3f} unsteered, "
             f"fluency@1 {per_method[best]['fluency@1']:.3f})"]
    for b in BASELINES:
        if b not in per_method:
            continue
        wins = sum(1 for e in per_feature.values() if b in e["methods"] and best in e["methods"]
                   and e["methods"][best]["test"]["hm@1"] > e["methods"][b]["test"]["hm@1"])
        n = sum(1 for e in per_feature.values() if b in e["methods"] and best in e["methods"])
        delta = per_method[best]["hm@1"] - per_method[b]["hm@1"]
        out[f"sae_minus_{b}_hm@1"] = delta
        out[f"sae_minus_{b}_concept@1"] = per_method[best]["concept@1"] - per_method[b]["concept@1"]
        out[f"sae_beats_{b}"] = bool(delta > 0)
        out[f"sae_wins_vs_{b}"] = f"{wins}/{n}"
        verb = "beats" if delta > 0 else "does not beat"
        lines.append(f"{verb} '{b}' (hm@1 {per_method[b]['hm@1']:.3f}, difference {delta:+.3f}, "
                     f"better on {wins}/{n} features)")
    out["summary"] = "; ".join(lines)
    return out


def _judge_verdict(out: dict[str, Any], per_feature: dict[str, Any], per_method: dict[str, dict[str, float]]) -> None:
    """The same question under the LLM judge: does the best SAE method beat each baseline on test judge_hm?

    Adds ``judge_*`` keys to ``out`` and a clause to its summary. Coefficients stay the ones chosen by
    validation hm@1, so both verdicts judge the same generations.
    """
    sae = [m for m in SAE_METHODS if m in per_method and not math.isnan(per_method[m]["judge_hm"])]
    if not sae:
        return
    best = max(sae, key=lambda m: per_method[m]["judge_hm"])
    out["judge_best_sae_method"] = best
    out["judge_sae_hm"] = per_method[best]["judge_hm"]
    unsteered = [e["unsteered"]["test"]["judge_hm"] for e in per_feature.values()]
    out["judge_unsteered_hm"] = float(np.nanmean(unsteered)) if any(not math.isnan(u) for u in unsteered) else math.nan
    lines = [f"LLM judge: SAE '{best}' test judge_hm {per_method[best]['judge_hm']:.3f} (0-2 scale; "
             f"concept {per_method[best]['judge_concept']:.2f}, instruction {per_method[best]['judge_instruction']:.2f}, "
             f"fluency {per_method[best]['judge_fluency']:.2f})"]
    for b in BASELINES:
        if b not in per_method or math.isnan(per_method[b]["judge_hm"]):
            continue
        pairs = [(e["methods"][best]["test"]["judge_hm"], e["methods"][b]["test"]["judge_hm"])
                 for e in per_feature.values() if b in e["methods"] and best in e["methods"]]
        wins = sum(1 for s, o in pairs if s > o)  # NaN (nothing rated) compares False: not a win
        delta = per_method[best]["judge_hm"] - per_method[b]["judge_hm"]
        out[f"judge_sae_minus_{b}_hm"] = delta
        out[f"judge_sae_beats_{b}"] = bool(delta > 0)
        out[f"judge_sae_wins_vs_{b}"] = f"{wins}/{len(pairs)}"
        verb = "beats" if delta > 0 else "does not beat"
        lines.append(f"{verb} '{b}' (judge_hm {per_method[b]['judge_hm']:.3f}, difference {delta:+.3f}, "
                     f"better on {wins}/{len(pairs)} features)")
    out["summary"] = out.get("summary", "") + ". " + "; ".join(lines)
