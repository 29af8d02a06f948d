"""Steering summaries in the report: one row per method and one per concept, read generically from
``results/steer.json`` instead of a dump of its per-feature leaves.

Any object under a key of :data:`SUMMARY_KEYS` (``methods``, ``concepts``, ...) whose values are all objects is
a summary: its entries become rows, their numbers (or ``{mean, ci95_low, ci95_high}`` estimates, shown with the
interval) and short strings (verdicts) become columns. The per-feature block (``features/<f>/methods/<m>/test``)
becomes a per-concept table of each method's test score at its chosen coefficient. So the section follows the
steering stage's file as it grows, without a table per layout.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.report.document import Para, Table

__all__ = ["SUMMARY_KEYS", "steer_summary_blocks"]

SUMMARY_KEYS = ("methods", "concepts", "ablation", "comparisons", "by_method", "by_concept")
MAX_COLUMNS = 9  # beyond this a table stops fitting a page; the rest stays in the file
MAX_ROWS = 30
SHORT_TEXT = 40  # strings up to this long (verdicts, choices) are columns; longer ones are sentences


def _num(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "—"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _estimate(d: dict[str, Any]) -> str | None:
    """``{mean, ci95_low, ci95_high}`` -> "0.123 [0.050, 0.200]"; None if ``d`` is not an estimate."""
    if "mean" not in d or not (d["mean"] is None or _is_num(d["mean"])):
        return None
    mean = "—" if d["mean"] is None else _num(float(d["mean"]))
    lo, hi = d.get("ci95_low"), d.get("ci95_high")
    return f"{mean} [{_num(float(lo))}, {_num(float(hi))}]" if _is_num(lo) and _is_num(hi) else mean


def _cells(entry: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, str]:
    """An entry's displayable leaves, ``path -> text`` in file order (two levels of nesting at most)."""
    out: dict[str, str] = {}
    for k, v in entry.items():
        name = f"{prefix}{k}"
        if _is_num(v):
            out[name] = _num(float(v)) if isinstance(v, float) else str(v)
        elif isinstance(v, str) and len(v) <= SHORT_TEXT:
            out[name] = v
        elif isinstance(v, dict):
            est = _estimate(v)
            if est is not None:
                out[name] = est
            elif depth < 1:
                out.update(_cells(v, f"{name}/", depth + 1))
    return out


def _table(entries: dict[str, Any], first: str) -> tuple[Table, int] | None:
    rows = {str(name): _cells(e) for name, e in entries.items() if isinstance(e, dict)}
    cols: list[str] = []
    for cells in rows.values():
        cols += [c for c in cells if c not in cols]
    if not cols:
        return None
    shown = cols[:MAX_COLUMNS]
    body = [[name] + [cells.get(c, "") for c in shown] for name, cells in list(rows.items())[:MAX_ROWS]]
    return Table([first, *shown], body), len(cols) - len(shown) + max(0, len(rows) - MAX_ROWS)


def _summaries(tree: Any, path: tuple[str, ...] = (), skip: tuple[str, ...] = ()
               ) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    found: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    if not isinstance(tree, dict):
        return found
    for k, v in tree.items():
        if k == "features" or k in skip or not isinstance(v, dict):
            continue
        if k in SUMMARY_KEYS and v and all(isinstance(e, dict) for e in v.values()):
            found.append(((*path, k), v))
        else:
            found += _summaries(v, (*path, k), skip)
    return found


def _per_feature(features: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``features/<f>/methods/<m>/{coefficient, test/<metric>}`` -> per concept: "<m> <metric>" and "<m> coef"."""
    out: dict[str, dict[str, Any]] = {}
    for f, e in features.items():
        if not isinstance(e, dict) or not isinstance(e.get("methods"), dict):
            continue
        label = next((e[k] for k in ("concept", "topic", "label") if isinstance(e.get(k), str)), "")
        row: dict[str, Any] = {}
        for m, d in e["methods"].items():
            test = d.get("test") if isinstance(d, dict) else None
            if not isinstance(test, dict):
                continue
            hm = next((k for k in test if k.startswith("hm@")), None)
            if hm is not None:
                row[f"{m} {hm}"] = test[hm]
            if _is_num(d.get("coefficient")):
                row[f"{m} coef"] = f"{d['coefficient']:g}"
        if row:
            out[f"feature {f}" + (f" ({label})" if label else "")] = row
    return out


def steer_summary_blocks(steer: dict[str, Any], skip: tuple[str, ...] = ()) -> list[Para | Table]:
    """Tables per method and per concept (and any other summary object) of a ``results/steer.json`` object;
    ``skip``: keys whose objects another renderer already shows (e.g. ``likelihood``)."""
    out: list[Para | Table] = []
    for path, entries in _summaries(steer, skip=skip):
        kind = path[-1].removeprefix("by_").rstrip("s")
        made = _table(entries, kind)
        if made is None:
            continue
        table, left = made
        out.append(Para(f"Per {kind} ({'/'.join(path)} in results/steer.json)" + (
            f"; {left} more columns/rows there." if left else ".")))
        out.append(table)
    feats = steer.get("features")
    if isinstance(feats, dict):
        made = _table(_per_feature(feats), "concept (steered feature)")
        if made is not None:
            table, left = made
            out.append(Para("Per concept: each method's test score at the coefficient chosen on validation "
                            "(features/*/methods in results/steer.json" + (f"; {left} more there)." if left else ").")))
            out.append(table)
    return out
