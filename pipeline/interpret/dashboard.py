"""Writes the static feature dashboard: ``<dir>/index.html`` (inline JSON index) + ``<dir>/data/shard-*.js``.

Examples are windows of ``WINDOW_BEFORE``/``WINDOW_AFTER`` tokens around the max activation (the
whole contexts are in ``examples.parquet``), so the dashboard of 4608 features stays ~tens of MB.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.interpret.dashboard_assets import CSS, HOOKS_PAGE, JS, PAGE
from pipeline.io import atomic_write_text, json_number

SHARD_SIZE = 64
WINDOW_BEFORE, WINDOW_AFTER = 20, 8


def _json(obj: Any) -> str:
    # Inline JSON inside <script>: escape "</" so a token string cannot close the tag.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


class DashboardShards:
    """Collects per-feature payloads and writes them in shards of ``SHARD_SIZE`` features."""

    def __init__(self, out_dir: Path, text: dict[int, str]) -> None:
        self.dir, self.text = Path(out_dir), text
        self.pending: dict[int, dict[int, Any]] = {}

    def example(self, tokens: np.ndarray, acts: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        n = int((tokens >= 0).sum())
        c = int(acts.argmax())
        lo, hi = max(0, c - WINDOW_BEFORE), min(n, c + WINDOW_AFTER + 1)
        return {**meta, "max": json_number(acts.max(initial=0), 5), "tok_ids": tokens[lo:hi].tolist(),
                "acts": np.round(acts[lo:hi].astype(np.float64), 3).tolist()}

    def add(self, feature: int, payload: dict[str, Any]) -> None:
        k = feature // SHARD_SIZE
        self.pending.setdefault(k, {})[feature] = payload

    def flush(self, upto_feature: int | None = None) -> None:
        """Write every complete shard (all shards when ``upto_feature`` is None)."""
        for k in sorted(self.pending):
            if upto_feature is not None and (k + 1) * SHARD_SIZE > upto_feature:
                continue
            feats = self.pending.pop(k)
            vocab: dict[int, int] = {}
            for p in feats.values():
                for ex in p["examples"]:
                    ex["toks"] = [vocab.setdefault(t, len(vocab)) for t in ex.pop("tok_ids")]
            strings = [self.text.get(t, "") for t in vocab]
            body = _json({"vocab": strings, "features": {str(f): p for f, p in feats.items()}})
            atomic_write_text(self.dir / "data" / f"shard-{k:04d}.js", f"window.__shard({k},{body});\n")


def write_index(out_dir: Path, hook: str, summary: str, columns: list[dict[str, Any]], rows: list[list[Any]],
                hist: dict[str, Any], sort: str = "feature") -> Path:
    """``index.html``: the feature table (``columns``: key, label, optional digits / hidden / why = index of the
    note shown in a blank cell / tokens = a list of token strings), first sorted by column ``sort`` ascending;
    ``hist``: the activation histogram's axis (log_min, per_decade, label)."""
    data = {"hook": hook, "summary": summary, "columns": columns, "rows": rows, "shard_size": SHARD_SIZE,
            "hist": hist, "sort": sort}
    page = PAGE.format(title=html.escape(f"Features of {hook}"), css=CSS, js=JS, data=_json(data))
    path = Path(out_dir) / "index.html"
    atomic_write_text(path, page)
    return path


def write_hooks_page(root: Path, entries: list[tuple[str, str, str]]) -> Path:
    """Top-level ``index.html`` linking each hook's dashboard: (hook, relative link, one-line summary)."""
    items = "".join(f'<li><a href="{html.escape(link)}">{html.escape(hook)}</a> <span class="meta">{html.escape(s)}</span></li>'
                    for hook, link, s in entries)
    path = Path(root) / "index.html"
    atomic_write_text(path, HOOKS_PAGE.format(css=CSS, items=items))
    return path
