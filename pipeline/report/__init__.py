"""The pipeline's summary report: ``reports/summary.md``, ``reports/summary.html``, ``reports/figures/*.png``.

:func:`~pipeline.report.inputs.gather` reads whatever the stages produced (every input optional),
:func:`~pipeline.report.sections.build_document` turns it into blocks, :func:`write_report` renders
Markdown (figures linked) and a self-contained HTML page (figures inlined), all written atomically.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_write_bytes, atomic_write_text
from pipeline.report.document import Document, Image, to_html, to_markdown
from pipeline.report.inputs import ReportInputs, gather
from pipeline.report.sections import DEFINITIONS, build_document

FIGURES = "figures"

__all__ = ["DEFINITIONS", "Document", "ReportInputs", "build_document", "gather", "write_report"]


def write_report(doc: Document, out_dir: Path) -> list[Path]:
    """Write ``summary.md``, ``summary.html`` and ``figures/*.png`` under ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / FIGURES
    written: list[Path] = []
    names = set()
    for b in doc.blocks:
        if isinstance(b, Image):
            atomic_write_bytes(fig_dir / b.name, b.data)
            written.append(fig_dir / b.name)
            names.add(b.name)
    # Figures of an earlier run that this run did not draw would otherwise linger next to the report.
    for old in fig_dir.glob("*.png") if fig_dir.is_dir() else []:
        if old.name not in names:
            old.unlink()
    fig_dir.mkdir(parents=True, exist_ok=True)  # a declared DVC output, present even with no figures
    atomic_write_text(out_dir / "summary.md", to_markdown(doc, FIGURES))
    atomic_write_text(out_dir / "summary.html", to_html(doc))
    return [out_dir / "summary.md", out_dir / "summary.html", *written]
