"""What the interpret stage writes per feature besides the examples: the dashboard's per-feature payload,
the ``features.parquet`` columns and the dashboard's index table."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.autointerp.simulate import FUZZING_VERSION
from pipeline.feature_ranking import RANKING, detection_notes, rank_features
from pipeline.interpret.bins import BINS_PER_DECADE, LOG_MIN, auroc_interval
from pipeline.interpret.contexts import ContextTable
from pipeline.interpret.dashboard import DashboardShards, write_index
from pipeline.interpret.examples import QUANTILE, TOP
from pipeline.io import json_number

__all__ = ["FUZZING", "SCORES", "dashboard_payload", "feature_columns", "top_example_tokens", "write_dashboard_index"]

FUZZING = f"fuzzing_balanced_accuracy@{FUZZING_VERSION}"
SCORES = ("detection_balanced_accuracy@1", "detection_f1@1", "detection_auc@1", FUZZING, f"fuzzing_auc@{FUZZING_VERSION}")
DASHBOARD_TOP = 8  # top-activating examples shown per feature


def dashboard_payload(j: int, block: Any, lo: int, hi: int, tokens: np.ndarray, acts: np.ndarray, table: ContextTable,
                      stats: Any, res: dict[str, Any], labels: list[str], auroc: np.ndarray, lens: tuple, nb: tuple,
                      co: tuple, text: dict[int, str], shards: DashboardShards, per_bin: int) -> dict[str, Any]:
    """Feature ``j``'s dashboard entry: histogram, scores, lens, neighbours, topics and its shown examples
    (rows ``lo:hi`` of ``block``; ``tokens``/``acts`` ``[E, T]``)."""
    exs = []
    for i in range(lo, hi):
        k, r = int(block.kind[i]), int(block.rank[i])
        if (k == TOP and r < DASHBOARD_TOP) or (k == QUANTILE and r % max(1, per_bin) == 0):
            c = int(block.ctx[i])
            mp = int(acts[i].argmax())
            doc = int(table.documents[c, mp])
            lab = int(table.labels[c, mp])
            exs.append(shards.example(tokens[i], acts[i], {
                "kind": "top" if k == TOP else "quantile", "rank": r, "context": int(table.context_ids[c]),
                "title": table.titles.get(doc), "label": labels[lab] if lab >= 0 else None}))
    ti, tv, bi, bv = lens
    r4 = lambda a: np.round(np.nan_to_num(a.astype(np.float64)), 4).tolist()  # noqa: E731
    keep = co[0][j] >= 0
    return {
        "hist": stats.hist[j].tolist(), "explanation": res.get("explanation"), "explainer": res.get("explainer"),
        "detection": json_number(res.get("detection_balanced_accuracy@1", np.nan), 4),
        "fuzzing": json_number(res.get(FUZZING, np.nan), 4),
        # id -1: no such entry (a zero decoder row has no lens and no neighbours)
        "promoted": [[text.get(t, ""), v] for t, v in zip(ti[j].tolist(), r4(tv[j]), strict=True) if t >= 0],
        "suppressed": [[text.get(t, ""), v] for t, v in zip(bi[j].tolist(), r4(bv[j]), strict=True) if t >= 0],
        "neighbours": [[t, v] for t, v in zip(nb[0][j].tolist(), r4(nb[1][j]), strict=True) if t >= 0],
        "cooc": [list(x) for x in zip(co[0][j][keep].tolist(), r4(co[1][j][keep]), strict=True)],
        "topics": sorted(([lab, json_number(auroc[j, i], 4)] for i, lab in enumerate(labels)), key=lambda x: -(x[1] or 0)),
        "examples": exs,
    }


def top_example_tokens(kind: np.ndarray, rank: np.ndarray, tokens: np.ndarray, acts: np.ndarray,
                       text: dict[int, str], n: int = 5) -> list[str]:
    """The token under the maximum of each of a feature's ``n`` best top examples, best first: what it fires on
    (the logit lens says what it promotes, another thing). ``kind``/``rank`` ``[E]``, ``tokens``/``acts`` ``[E, T]``."""
    rows = [i for i in np.argsort(rank, kind="stable").tolist() if kind[i] == TOP][:n]
    return [text.get(int(tokens[i, int(acts[i].argmax())]), "") for i in rows]


def feature_columns(d: int, stats: Any, results: dict[int, dict[str, Any]], labels: list[str], auroc: np.ndarray,
                     best_idx: np.ndarray, best_au: np.ndarray, top_ids: np.ndarray, top_logits: np.ndarray,
                     bot_ids: np.ndarray, bot_logits: np.ndarray, nb_ids: np.ndarray, nb_cos: np.ndarray,
                     co_ids: np.ndarray, co_j: np.ndarray, text: dict[int, str],
                     example_tokens: dict[int, list[str]] | None = None) -> dict[str, Any]:
    """The columns of ``features.parquet``, one row per feature (``d`` of them); ``example_tokens``: feature ->
    :func:`top_example_tokens` (empty where absent: a dead feature)."""
    fire = stats.fire_count
    n_seg = np.asarray(stats.n_segments, dtype=np.int64)  # [L] segments per topic
    n_pos = n_seg[np.clip(best_idx, 0, None)] if len(n_seg) else np.zeros(d, dtype=np.int64)
    lo, hi = auroc_interval(best_au, np.where(best_idx >= 0, n_pos, 0), n_seg.sum() - n_pos)
    get = lambda key: [results.get(j, {}).get(key) for j in range(d)]  # noqa: E731
    cols: dict[str, Any] = {
        "feature": np.arange(d, dtype=np.int32),
        "fire_count": fire.astype(np.int64),
        "frequency": fire / max(stats.n_tokens, 1),
        "mean_activation": np.where(fire > 0, stats.act_sum / np.maximum(fire, 1), 0.0),
        "max_activation": stats.act_max.astype(np.float32),
        "hist_counts": stats.hist.astype(np.int64),
        "top_token_ids": top_ids.astype(np.int32), "top_tokens": [[text.get(int(t), "") for t in r] for r in top_ids],
        "top_logits": top_logits.astype(np.float32),
        "example_tokens": [(example_tokens or {}).get(j, []) for j in range(d)],
        "bottom_token_ids": bot_ids.astype(np.int32), "bottom_tokens": [[text.get(int(t), "") for t in r] for r in bot_ids],
        "bottom_logits": bot_logits.astype(np.float32),
        "neighbours": nb_ids.astype(np.int32), "neighbour_cosine": nb_cos.astype(np.float32),
        "cooccurring": co_ids.astype(np.int32), "cooccurrence_jaccard": co_j.astype(np.float32),
        "topic": [labels[i] if i >= 0 else None for i in best_idx.tolist()],
        "topic_auroc@1": best_au.astype(np.float64),
        # Its 95% interval from the segment counts (bins.auroc_interval): ranks by what survives the sample size.
        "topic_auroc_ci95_low@1": lo, "topic_auroc_ci95_high@1": hi,
        "explanation": get("explanation"), "explainer": get("explainer"), "scorer": get("scorer"),
    }
    if labels:
        cols["topic_aurocs@1"] = auroc.astype(np.float32)
    for s in SCORES:
        cols[s] = np.array([np.nan if v is None else v for v in get(s)], dtype=np.float64)
    return cols


def write_dashboard_index(dash_dir: Path, hook: str, cols: dict[str, Any], m: dict[str, Any]) -> None:
    """The dashboard's sortable feature table (from the ``features.parquet`` columns) and summary line.

    It opens sorted by :func:`~pipeline.feature_ranking.rank_features` (the report's "Top features" order);
    a blank detection cell says why (:func:`~pipeline.feature_ranking.detection_notes`)."""
    d = len(cols["feature"])
    det, fuzz = cols["detection_balanced_accuracy@1"], cols[FUZZING]
    none = np.full(d, np.nan)  # a table without intervals (an older run): the point AUROC ranks, no interval shown
    au_lo, au_hi = cols.get("topic_auroc_ci95_low@1", none), cols.get("topic_auroc_ci95_high@1", none)
    order, tier = rank_features(cols["fire_count"], m["interpret_tokens"], det, fuzz,
                                au_lo if "topic_auroc_ci95_low@1" in cols else cols["topic_auroc@1"])
    rank = np.empty(d, dtype=np.int64)
    rank[order] = np.arange(1, d + 1)
    notes = detection_notes(cols["fire_count"], np.array([e is not None for e in cols["explanation"]]), det, fuzz)
    columns: list[dict[str, Any]] = [
        {"key": "feature", "label": "feature"}, {"key": "rank", "label": "rank"},
        {"key": "fires", "label": "fires on"}, {"key": "frequency", "label": "frequency", "digits": 5},
        {"key": "max", "label": "max act", "digits": 2}, {"key": "score", "label": "detection", "digits": 3, "why": 12},
        {"key": "fuzz", "label": "fuzzing", "digits": 3}, {"key": "topic", "label": "topic"},
        {"key": "auroc", "label": "topic AUROC [95% CI]", "digits": 3, "ci": [13, 14]},
        {"key": "tokens", "label": "top tokens", "tokens": True},
        {"key": "explanation", "label": "explanation"}, {"key": "tier", "label": "tier", "hidden": True},
        {"key": "why", "label": "", "hidden": True}, {"key": "auroc_lo", "label": "", "hidden": True},
        {"key": "auroc_hi", "label": "", "hidden": True}]
    f = partial(json_number, digits=6)
    rows = [[int(j), int(rank[j]), int(cols["fire_count"][j]), f(cols["frequency"][j]), f(cols["max_activation"][j]),
             f(det[j]), f(fuzz[j]), cols["topic"][j], f(cols["topic_auroc@1"][j]),
             list(cols.get("example_tokens", [[]] * d)[j]), cols["explanation"][j], int(tier[j]), notes[j],
             f(au_lo[j]), f(au_hi[j])] for j in range(d)]
    assert columns[5]["why"] == 12 and columns[8]["ci"] == [13, 14] and len(columns) == len(rows[0])
    med = m["median_topic_auroc@1"]
    summary = (f"{m['alive_features@1']} alive of {d} features over {m['interpret_tokens']:,} tokens; "
               f"median topic AUROC {'n/a' if med is None else f'{med:.3f}'}; explainer {m['explainer']}. "
               f"Opens {RANKING}; click a column to sort by it.")
    hist = {"log_min": LOG_MIN, "per_decade": BINS_PER_DECADE,
            "label": f"activation (log scale, bins of 1/{BINS_PER_DECADE} decade); bar height: sqrt(count)"}
    write_index(dash_dir, hook, summary, columns, rows, hist, sort="rank")
