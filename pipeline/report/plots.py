"""PNG figures of the report, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import io
import math
from typing import Any

from pipeline.tracking.store import RunPoint

MAX_LABELS = 30
CURVE_PANELS = (("loss", "training loss"), ("l0", "L0 (active latents / token)"),
                ("fvu", "FVU of the batch (fvu_batch)"),
                ("dead_fraction", "dead fraction of the window\n(dead_fraction_window)"))


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; never touches pyplot

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No "Software"/date metadata: the same inputs give the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def frontier_png(points: list[RunPoint], y: str = "fvu", y_label: str = "FVU (lower is better)") -> bytes | None:
    """L0 on x against ``y`` on y, one labelled point per run; the current run drawn as a red star.

    Sparsity–fidelity frontier as in Gao et al. 2024 (Fig. 2) and Rajamanoharan et al. 2024: a run
    to the lower left dominates. Returns None when no run has both metrics.
    """
    pts = [p for p in points if "l0" in p.metrics and y in p.metrics
           and all(math.isfinite(p.metrics[k]) for k in ("l0", y))]
    if not pts:
        return None
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    others = [p for p in pts if not p.current]
    if others:
        ax.scatter([p.metrics["l0"] for p in others], [p.metrics[y] for p in others],
                   s=28, color="#4c72b0", label="other runs", zorder=2)
    for p in pts if len(pts) <= MAX_LABELS else [p for p in pts if p.current]:  # hundreds of labels are ink
        ax.annotate(p.run_name, (p.metrics["l0"], p.metrics[y]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="#c44e52" if p.current else "#333333")
    cur = [p for p in pts if p.current]
    if cur:
        ax.scatter([p.metrics["l0"] for p in cur], [p.metrics[y] for p in cur], marker="*", s=160,
                   color="#c44e52", label="this run", zorder=3)
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(y_label)
    ax.set_title(f"L0 – {y_label.split(' (')[0]} frontier across runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def curves_png(curves: dict[str, list[list[float]]], title: str) -> bytes | None:
    """Training curves of one SAE: one panel per column of ``plots/train/<hook>.csv`` that has points."""
    fig = curves_figure(curves, title)
    return None if fig is None else _png(fig)


def curves_figure(curves: dict[str, list[list[float]]], title: str) -> Any:
    """The figure of :func:`curves_png` (None without points)."""
    panels = [(c, label) for c, label in CURVE_PANELS if curves.get(c)]
    if not panels:
        return None
    fig = _figure(3.2 * len(panels), 2.8)
    for i, (col, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        steps = [s for s, _ in curves[col]]
        vals = [v for _, v in curves[col]]
        ax.plot(steps, vals, color="#4c72b0", linewidth=1.2)
        lo, hi = min(vals), max(vals)
        if hi - lo <= 1e-3 * max(abs(hi), abs(lo), 1e-12):  # a constant (TopK's L0): show it, not its rounding noise
            pad = max(0.05 * abs(hi), 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", useOffset=False)  # a flat L0 of 32 read as "+3.2e1" plus tiny ticks
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig
