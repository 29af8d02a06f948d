"""Steering plots: DVC plot CSVs and PNGs.

- ``concept.csv``            coefficient + one column per method of ``STEER_METHODS`` (empty when not
                             run): mean concept@2 over features and all prompts — one DVC plot,
                             one series per method
- ``fluency.csv``            the same for fluency@2
- ``frontier/<method>.csv``  concept@2, fluency@2, coefficient: the concept–fluency trade-off curve
                             (x differs per method, so one file each)
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from pipeline.io import atomic_write_bytes, atomic_write_text
from pipeline.params.analysis import STEER_METHODS

__all__ = ["sweep_curves", "write_plot_csvs", "write_pngs"]


def sweep_curves(df: pl.DataFrame) -> pl.DataFrame:
    """Mean concept@2 and fluency@2 per (method, coefficient) over features and prompts."""
    return (df.filter(pl.col("method") != "none")
              .group_by("method", "coefficient")
              .agg(pl.col("concept@2").mean(), pl.col("fluency@2").mean(), pl.col("hm@2").mean())
              .sort("method", "coefficient"))


def write_plot_csvs(curves: pl.DataFrame, root: Path) -> list[Path]:
    written = []
    for name, col in (("concept", "concept@2"), ("fluency", "fluency@2")):
        wide = pl.DataFrame({"coefficient": sorted(curves["coefficient"].unique().to_list())})
        for m in STEER_METHODS:  # fixed columns, so the dvc.yaml plot definition never names a missing one
            g = curves.filter(pl.col("method") == m).select("coefficient", pl.col(col).alias(m))
            wide = wide.join(g, on="coefficient", how="left")
        written.append(_write_csv(wide, root / f"{name}.csv"))
    for (method,), g in curves.group_by("method", maintain_order=True):
        written.append(_write_csv(g.select("concept@2", "fluency@2", "coefficient"), root / "frontier" / f"{method}.csv"))
    return written


def _write_csv(df: pl.DataFrame, path: Path) -> Path:
    buf = io.StringIO()
    df.write_csv(buf)
    atomic_write_text(path, buf.getvalue())
    return path


def write_pngs(curves: pl.DataFrame, root: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, x, y, title in (("concept_vs_coefficient", "coefficient", "concept@2", "Concept vs coefficient"),
                              ("fluency_vs_coefficient", "coefficient", "fluency@2", "Fluency vs coefficient"),
                              ("frontier", "concept@2", "fluency@2", "Concept–fluency frontier")):
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
        for (method,), g in curves.group_by("method", maintain_order=True):
            ax.plot(g[x].to_list(), g[y].to_list(), marker="o", label=str(method))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = root / f"{name}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written
