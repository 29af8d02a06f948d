"""What the report shows, read from the files the earlier stages wrote — every one of them optional.

A stage that has not run (or is not implemented in this checkout) leaves its file missing; the
report then says "not run" in that section instead of failing, and :attr:`ReportInputs.missing`
lists what was absent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.paths import ACTIVATIONS, DASHBOARD, INTERPRET, MODELS, RESULTS, STEER_FIGURES, TRAIN_CURVES
from pipeline.tracking.record import (
    environment_tags,
    headline_metrics,
    read_curve,
    read_manifest,
    read_stage_metrics,
)
from pipeline.tracking.store import RunPoint

log = logging.getLogger(__name__)

# Columns of data/interpret/<hook>/features.parquet shown in the report: (label, candidate column
# names, first present wins). Versioned names (topic_auroc@1) are matched by their base too.
FEATURE_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("feature", ("feature",)),
    ("fires on", ("fire_count",)),
    ("frequency", ("frequency",)),
    ("score", ("score", "detection_balanced_accuracy", "detection_auc")),
    ("fuzzing", ("fuzzing_balanced_accuracy",)),
    ("topic_auroc", ("topic_auroc",)),
    ("topic_auroc_low", ("topic_auroc_ci95_low",)),
    ("topic_auroc_high", ("topic_auroc_ci95_high",)),
    ("best_topic", ("best_topic", "topic")),
    ("example tokens", ("example_tokens",)),
    ("explanation", ("explanation",)),
)
# Tables without firing counts (older runs, other tools) are ranked by the first of these with any finite value.
FEATURE_RANK = ("score", "topic_auroc", "frequency")


def _find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    for cand in candidates:
        hits = [c for c in columns if c == cand or c.split("@")[0] == cand]
        if hits:
            return max(hits)  # the highest definition version
    return None


@dataclass
class ReportInputs:
    """Everything rendered into ``reports/summary.{md,html}``; paths relative to the workspace root."""

    params: dict[str, Any]
    hooks: list[str]
    run: dict[str, str] = field(default_factory=dict)
    stage_metrics: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    sae_cfgs: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    features: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    feature_counts: dict[str, int] = field(default_factory=dict)
    feature_ranking: dict[str, str] = field(default_factory=dict)  # hook -> how its top features were ranked
    environment: dict[str, str] = field(default_factory=dict)  # env.<key> tags of the metrics files
    steer: dict[str, Any] | None = None
    steer_pngs: list[Path] = field(default_factory=list)
    dashboard: Path | None = None
    headline: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (value, source key)
    frontier: list[RunPoint] | None = None
    frontier_note: str = ""
    tracking_note: str = ""
    missing: list[str] = field(default_factory=list)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _visible(token: str) -> str:
    # " on" and "on" are different tokens: show the leading space (as the dashboard does).
    return ("\u2423" + token[1:] if token.startswith(" ") else token).replace("\n", "\u21b5")


def _token_list(tokens: Any) -> str:
    """Distinct tokens in order, repeats counted: [" well", " well", "on"] -> "␣well ×2  on"."""
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    return "  ".join(_visible(t) + (f" \u00d7{k}" if k > 1 else "") for t, k in counts.items())


def top_features(path: Path, n: int) -> tuple[list[dict[str, Any]], int, str]:
    """Top ``n`` rows of a features table as ``{label: value}`` with the labels of :data:`FEATURE_COLUMNS` that
    the table has, the table's row count, and how they were ranked: by
    :func:`~pipeline.feature_ranking.rank_features` (the dashboard's order) when the table has firing
    counts, else by the first of :data:`FEATURE_RANK` with a finite value."""
    import polars as pl

    from pipeline.feature_ranking import RANKING, rank_features

    df = pl.read_parquet(path)
    found = {label: col for label, cands in FEATURE_COLUMNS if (col := _find_column(df.columns, cands))}
    df = df.select([pl.col(c).alias(label) for label, c in found.items()])
    how = "in table order"
    num = lambda c: df[c].cast(pl.Float64).fill_null(float("nan")).to_numpy()  # noqa: E731
    if {"fires on", "frequency"} <= set(df.columns) and df.height:
        fire, freq = df["fires on"].to_numpy(), num("frequency")
        k = int(freq.argmax())
        n_tokens = round(fire[k] / freq[k]) if freq[k] > 0 else 1
        nan = np.full(df.height, np.nan)
        order, _ = rank_features(fire, n_tokens, num("score") if "score" in df.columns else nan,
                                 num("fuzzing") if "fuzzing" in df.columns else nan,
                                 next((num(c) for c in ("topic_auroc_low", "topic_auroc") if c in df.columns), nan))
        df = df[order.tolist()]
        how = RANKING
    else:
        for label in FEATURE_RANK:
            if label in df.columns and df[label].dtype.is_numeric():
                key = pl.col(label).cast(pl.Float64).fill_nan(None)  # NaN would sort above every number
                if df.select(key.is_not_null().any()).item():
                    df = df.sort(key, descending=True, nulls_last=True)
                    how = f"by {label}"
                    break
    if "example tokens" in df.columns and isinstance(df.schema["example tokens"], pl.List):
        df = df.with_columns(pl.col("example tokens").map_elements(_token_list, return_dtype=pl.String))
    return df.head(n).to_dicts(), df.height, how


def gather(root: Path, params: dict[str, Any], hooks: list[str], top_n: int) -> ReportInputs:
    """Read the workspace at ``root``; ``params`` are the flattened dotted params."""
    root = Path(root)
    inp = ReportInputs(params=dict(params), hooks=list(hooks))
    inp.stage_metrics = read_stage_metrics(root / RESULTS)
    inp.environment = environment_tags(root / RESULTS)
    inp.headline = headline_metrics(inp.stage_metrics, hooks[0] if hooks else None)
    for stage in ("prepare", "extract", "train", "evaluate", "interpret", "steer"):
        if stage not in inp.stage_metrics:
            inp.missing.append(str(RESULTS / f"{stage}.json"))
    for hook in hooks:
        if not inp.manifest:
            inp.manifest = read_manifest(root, hook)
        cfg = _json(root / MODELS / hook / "cfg.json")
        if cfg is not None:
            inp.sae_cfgs[hook] = cfg
        else:
            inp.missing.append(str(MODELS / hook / "cfg.json"))
        curve = root / TRAIN_CURVES / f"{hook}.csv"
        if curve.is_file():
            inp.curves[hook] = read_curve(curve)
        else:
            inp.missing.append(str(curve.relative_to(root)))
        feats = root / INTERPRET / hook / "features.parquet"
        if feats.is_file():
            try:
                inp.features[hook], inp.feature_counts[hook], inp.feature_ranking[hook] = top_features(feats, top_n)
            except Exception as e:  # a malformed table must not sink the whole report
                log.warning("cannot read %s: %s", feats, e)
                inp.missing.append(str(feats.relative_to(root)))
        else:
            inp.missing.append(str(feats.relative_to(root)))
    if not inp.manifest:
        inp.missing.append(str(ACTIVATIONS / "train" / "<hook>" / "manifest.json"))
    inp.steer = _json(root / RESULTS / "steer.json")
    steer_dir = root / STEER_FIGURES
    inp.steer_pngs = sorted(steer_dir.glob("*.png")) if steer_dir.is_dir() else []
    dash = root / DASHBOARD / "index.html"
    inp.dashboard = dash if dash.is_file() else None
    return inp
