"""Parquet outputs of the interpret stage (atomic) and its versioned summary metrics.

``examples.parquet``: one row per (feature, kind, rank): feature, kind (top|quantile|random), rank,
context_id, max_position, max_activation, tokens list<int32>, activations list<float32> (whole
context, 0 where silent), text (decoded context), document_id, title and label at the max position.
Written one row group per feature block through a temp file, renamed when complete.

``features.parquet``: one row per feature (see :func:`features_table`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.interpret.contexts import ContextTable
from pipeline.interpret.examples import KINDS, Selection
from pipeline.io import TMP_SUFFIX, fsync_replace


def _lists(values: np.ndarray, lengths: np.ndarray, typ: pa.DataType) -> pa.Array:
    """Rows of ``values[E, T]`` truncated to ``lengths[E]`` -> list array."""
    mask = np.arange(values.shape[1])[None, :] < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[mask], type=typ))


class ExamplesWriter:
    """Stream example rows into ``path`` (temp name until :meth:`close`)."""

    def __init__(self, path: Path, table: ContextTable, context_text: dict[int, str]) -> None:
        self.path, self.table, self.text = Path(path), table, context_text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.writer: pq.ParquetWriter | None = None

    def write(self, sel: Selection, acts: np.ndarray) -> None:
        t = self.table
        tokens = t.tokens[sel.ctx]  # [E, T]
        lengths = (tokens >= 0).sum(1)
        maxpos = acts.argmax(1)
        doc = t.documents[sel.ctx, maxpos]
        lab = t.labels[sel.ctx, maxpos]
        cols = {
            "feature": pa.array(sel.feature.astype(np.int32)),
            "kind": pa.array(np.array(KINDS)[sel.kind]),
            "rank": pa.array(sel.rank.astype(np.int32)),
            "context_id": pa.array(t.context_ids[sel.ctx].astype(np.int32)),
            "max_position": pa.array(maxpos.astype(np.int32)),
            "max_activation": pa.array(acts.max(1, initial=0).astype(np.float32)),
            "tokens": _lists(tokens.astype(np.int32), lengths, pa.int32()),
            "activations": _lists(acts.astype(np.float32), lengths, pa.float32()),
            "text": pa.array([self.text[int(c)] for c in sel.ctx], type=pa.string()),
            "document_id": pa.array(doc.astype(np.int32)),
            "title": pa.array([t.titles.get(int(x)) for x in doc], type=pa.string()),
            "label": pa.array([t.label_names[x] if x >= 0 else None for x in lab.tolist()], type=pa.string()),
        }
        batch = pa.table(cols)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, batch.schema, compression="zstd")
        self.writer.write_table(batch)

    def close(self) -> None:
        if self.writer is None:  # no examples at all (every feature dead): still a readable, empty table
            e = np.zeros(0, dtype=np.int64)
            self.write(Selection(e, e, e, e), np.zeros((0, self.table.context_length), np.float32))
        assert self.writer is not None
        self.writer.close()
        fsync_replace(self.tmp, self.path)


def features_table(cols: dict[str, Any]) -> pa.Table:
    """Column dict (numpy 1-D arrays, ``[d_sae, k]`` arrays become list columns, lists of str) -> table."""
    out = {}
    for name, v in cols.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            lengths = np.full(v.shape[0], v.shape[1])
            typ = pa.from_numpy_dtype(v.dtype)
            out[name] = _lists(v, lengths, typ)
        elif isinstance(v, np.ndarray):
            out[name] = pa.array(v)
        else:
            out[name] = pa.array(v)
    return pa.table(out)


def _finite_mean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def summary_metrics(fire_count: np.ndarray, n_tokens: int, best_auroc: np.ndarray,
                    scores: dict[str, np.ndarray], explainer: str, n_explained: int) -> dict[str, Any]:
    """Versioned summary numbers of one hook (None where undefined, e.g. no topic labels).

    ``median_topic_auroc@1`` / ``frac_topic_auroc_ge_0.9@1``: over alive features, of each feature's best
    ``topic_auroc@1``. ``mean_explanation_score@1``: mean ``detection_balanced_accuracy@1`` of the
    features explained by the configured explainer (the headline score; all scorer means follow)."""
    alive = fire_count > 0
    au = best_auroc[alive & np.isfinite(best_auroc)]
    out: dict[str, Any] = {
        "alive_features@1": int(alive.sum()),
        "interpret_dead_fraction@1": float(1.0 - alive.mean()) if len(alive) else None,
        "interpret_tokens": int(n_tokens),
        "median_topic_auroc@1": float(np.median(au)) if len(au) else None,
        "frac_topic_auroc_ge_0.9@1": float((au >= 0.9).mean()) if len(au) else None,
        "explained_features": int(n_explained),
        "explainer": explainer,
    }
    for name, v in scores.items():
        out[f"mean_{name}"] = _finite_mean(v)
    out["mean_explanation_score@1"] = out.get("mean_detection_balanced_accuracy@1")
    return out
