"""Sparsity-fidelity frontier across DVC experiments: L0 vs FVU and L0 vs CE loss recovered.

Input is the JSON of ``dvc exp show --json`` (DVC 3.x: a list of commits, each with ``data`` and
nested ``experiments[].revs[]``); every commit or experiment whose ``metrics/evaluate.json`` (the
evaluate stage's flat headline, :mod:`pipeline.headline`) has an L0 for a hook becomes one labelled point. The Pareto-optimal points (no other run has both lower
L0 and better fidelity) are joined by a line, the usual way SAE sweeps are compared (Gao et al.
2024, Fig. 2; Rajamanoharan et al. 2024).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.paths import METRICS

log = logging.getLogger(__name__)

EVALUATE_METRICS = (METRICS / "evaluate.json").as_posix()  # its key in `dvc exp show --json`
BENCH_METRICS = (METRICS / "bench.json").as_posix()  # the bench stage's headline (SAEBench-comparable evals)
# Bench headline base names plotted against L0 when a run has them: (axis label, higher is better).
BENCH_PANELS = {"sae_top_1_test_accuracy": ("sparse probing top-1 accuracy", True),
                "mean_absorption_fraction": ("mean absorption fraction", False)}


@dataclass
class Point:
    name: str  # experiment name, branch/tag name, or short commit
    hook: str
    l0: float
    fvu: float | None
    ce_recovered: float | None
    extra: dict[str, float] = field(default_factory=dict)  # bench headline values (BENCH_PANELS names)


def _runs(entries: list[dict[str, Any]], include_workspace: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, data) for every commit and experiment in ``dvc exp show --json`` output."""
    out: list[tuple[str, dict[str, Any]]] = []
    for e in entries:
        rev = e.get("rev") or ""
        if e.get("data") and (include_workspace or rev != "workspace"):
            out.append((e.get("name") or rev[:7], e["data"]))
        for exp in e.get("experiments") or []:
            for r in exp.get("revs") or []:
                if r.get("data"):
                    out.append((r.get("name") or exp.get("name") or (r.get("rev") or "")[:7], r["data"]))
    return out


def _by_hook(headline: dict[str, Any], first_hook: str) -> dict[str, dict[str, float]]:
    """``{hook: {base name: value}}`` from a flat headline (``fvu@3`` for the first hook, ``<hook>/fvu@3`` for
    others; the highest version of a base name wins) or from the nested per-hook files of older commits."""
    versions: dict[str, dict[str, tuple[int, float]]] = {}
    for key, value in headline.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, v in items:
            hook = key if isinstance(value, dict) else (key.rpartition("/")[0] or first_hook)
            base, _, version = name.rpartition("/")[2].partition("@")
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            rank = int(version) if version.isdigit() else 0
            if rank >= versions.setdefault(hook, {}).get(base, (-1, 0.0))[0]:
                versions[hook][base] = (rank, float(v))
    return {hook: {b: v for b, (_, v) in names.items()} for hook, names in versions.items()}


def _first_hook(data: dict[str, Any]) -> str:
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    hooks = (params.get("extract") or {}).get("hooks") or []
    return str(hooks[0]) if hooks else "first hook"


def frontier_points(exp_show: list[dict[str, Any]], include_workspace: bool = False) -> list[Point]:
    """One point per (run, hook) that has an L0 in its evaluate headline; first occurrence of a label wins."""
    points: list[Point] = []
    seen: set[tuple[str, str]] = set()
    for label, data in _runs(exp_show, include_workspace):
        head = ((data.get("metrics") or {}).get(EVALUATE_METRICS) or {}).get("data") or {}
        bench = _by_hook(((data.get("metrics") or {}).get(BENCH_METRICS) or {}).get("data") or {}, _first_hook(data))
        for hook, m in _by_hook(head, _first_hook(data)).items():
            if m.get("l0") is None or (label, hook) in seen:
                continue
            seen.add((label, hook))
            extra = {k: v for k, v in bench.get(hook, {}).items() if k in BENCH_PANELS}
            points.append(Point(label, hook, m["l0"], m.get("fvu"), m.get("ce_loss_recovered"), extra))
    return points


def pareto(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Non-dominated (L0, fidelity) points sorted by L0: lower L0 and better fidelity dominate."""
    best: list[tuple[float, float]] = []
    for l0, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not best or (y > best[-1][1] if higher_is_better else y < best[-1][1]):
            best.append((l0, y))
    return best


def plot_frontier(points: list[Point], out: str | Path) -> Path:
    """Panels L0-FVU, L0-CE loss recovered, and L0 against each :data:`BENCH_PANELS` metric some run has
    (sparse probing accuracy, absorption); one colour per hook, one labelled point per run; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_write_bytes

    panels = [("FVU", "fvu", False), ("CE loss recovered", "ce_recovered", True)]
    panels += [(title, name, higher) for name, (title, higher) in BENCH_PANELS.items() if any(name in p.extra for p in points)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5))
    hooks = sorted({p.hook for p in points})

    def value(p: Point, attr: str) -> float | None:
        return getattr(p, attr) if attr in ("fvu", "ce_recovered") else p.extra.get(attr)

    for ax, (title, attr, higher) in zip(axes, panels, strict=True):
        for i, hook in enumerate(hooks):
            pts = [(p.l0, value(p, attr), p.name) for p in points if p.hook == hook and value(p, attr) is not None]
            if not pts:
                continue
            color = f"C{i}"
            ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=color, label=hook, zorder=3)
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            front = pareto([(x, y) for x, y, _ in pts], higher)
            ax.plot([x for x, _ in front], [y for _, y in front], color=color, alpha=0.5, zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(title)
        ax.set_title(f"L0 vs {title}" + (" (higher is better)" if higher else " (lower is better)"))
        ax.grid(alpha=0.3)
    if hooks:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


__all__ = ["Point", "BENCH_PANELS", "frontier_points", "pareto", "plot_frontier"]
