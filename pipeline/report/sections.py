"""The report's sections, built from :class:`~pipeline.report.inputs.ReportInputs` as document blocks."""

from __future__ import annotations

import math
from typing import Any

from pipeline.metric_names import DEFINITIONS
from pipeline.report.document import Bullets, Document, Heading, Image, Links, Para, Table
from pipeline.report.inputs import FEATURE_COLUMNS, FEATURE_RANK, ReportInputs
from pipeline.report.plots import curves_png, frontier_png
from pipeline.report.steer import verdict_blocks
from pipeline.tracking.names import metric_base

STAGES = ("prepare", "extract", "train", "evaluate", "interpret", "steer")
MAX_ROWS_PER_STAGE = 40
MAX_FRONTIER_ROWS = 30


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def definition(name: str) -> str:
    """The definition of ``name`` (e.g. ``fvu@2``): its exact version's entry, else its base name's."""
    base, version = metric_base(name)
    exact = DEFINITIONS.get(f"{base.lower()}@{version}") if version is not None else None
    return exact or DEFINITIONS.get(base.lower(), "")


def run_section(doc: Document, inp: ReportInputs) -> None:
    r = inp.run
    items = [f"Run: {r.get('run_name', '?')}"]
    if r.get("commit"):
        items.append(f"Git commit: {r['commit'][:12]}" + (" (uncommitted changes)" if r.get("dirty") == "true" else ""))
    if r.get("exp_name"):
        items.append(f"DVC experiment: {r['exp_name']} (baseline {r.get('baseline_rev', '')[:12]})")
    if inp.tracking_note:
        items.append(inp.tracking_note)
    doc.add(Heading(1, "Run"), Bullets(items))


def setup_section(doc: Document, inp: ReportInputs) -> None:
    p, m = inp.params, inp.manifest
    rows = [
        ["model", str(m.get("model_id", p.get("model.name", "?")))],
        ["model revision", str(m.get("revision", p.get("model.revision", "?")))],
        ["weights hash", str(m["weights_hash"])[:16] if m.get("weights_hash") else "not recorded (extract not run)"],
        ["compute dtype", str(p.get("model.dtype", "?"))],
        ["corpus", str(m.get("corpus", p.get("corpus.source", "?")))],
        ["context length", fmt(p.get("corpus.context_length", "?"))],
        ["token budget", fmt(p.get("corpus.n_tokens", "?"))],
        ["hooks", ", ".join(inp.hooks)],
    ]
    if "n_tokens" in m:
        rows.append(["tokens extracted (train split, first hook)", fmt(m["n_tokens"])])
    doc.add(Heading(1, "Model, corpus and hook"), Table(["", "value"], rows))
    doc.add(Heading(1, "SAE"))
    sae_keys = sorted(k for k in p if k.startswith("sae."))
    for hook in inp.hooks:
        cfg = inp.sae_cfgs.get(hook)
        if cfg is None:
            doc.add(Para(f"{hook}: no trained SAE found (train not run); configured: "
                         + ", ".join(f"{k[4:]}={fmt(p[k])}" for k in sae_keys), note=True))
            continue
        flat = [[k, fmt(v)] for k, v in sorted(cfg.items()) if not isinstance(v, (dict, list))]
        doc.add(Para(f"{hook} (models/sae/{hook}/cfg.json):"), Table(["field", "value"], flat))


def metrics_section(doc: Document, inp: ReportInputs) -> None:
    doc.add(Heading(1, "Key metrics"),
            Para("Names carry their definition version (fvu@2): numbers with different versions are not comparable.",
                 note=True))
    if inp.headline:
        rows = [[name, fmt(v), src, definition(src.split("/")[-1])] for name, (v, src) in inp.headline.items()]
        doc.add(Heading(2, "Headline (logged to MLflow as l0, fvu, ce_loss_recovered)"),
                Table(["metric", "value", "from", "definition"], rows))
    order = [s for s in STAGES if s in inp.stage_metrics] + sorted(set(inp.stage_metrics) - set(STAGES))
    for stage in STAGES:
        if stage not in inp.stage_metrics:
            doc.add(Para(f"{stage}: not run (metrics/{stage}.json missing).", note=True))
    for stage in order:
        values = list(inp.stage_metrics[stage].items())
        rows = [["/".join(path), fmt(v), definition(path[-1])] for path, v in values[:MAX_ROWS_PER_STAGE]]
        doc.add(Heading(2, f"{stage} (metrics/{stage}.json)"), Table(["metric", "value", "definition"], rows))
        if len(values) > MAX_ROWS_PER_STAGE:
            doc.add(Para(f"{len(values) - MAX_ROWS_PER_STAGE} more in metrics/{stage}.json.", note=True))


def curves_section(doc: Document, inp: ReportInputs) -> None:
    doc.add(Heading(1, "Training curves"))
    for hook in inp.hooks:
        png = curves_png(inp.curves.get(hook, {}), hook)
        if png is None:
            doc.add(Para(f"{hook}: not run (plots/train/{hook}.csv missing or empty).", note=True))
        else:
            doc.add(Image(f"curves_{hook}.png", png, f"training curves of {hook}"))


def frontier_section(doc: Document, inp: ReportInputs) -> None:
    doc.add(Heading(1, "L0–FVU frontier across experiments"))
    if inp.frontier_note:
        doc.add(Para(inp.frontier_note, note=True))
    points = inp.frontier or []
    for y, label, name in (("fvu", "FVU (lower is better)", "frontier_fvu.png"),
                           ("ce_loss_recovered", "CE loss recovered (higher is better)", "frontier_ce.png")):
        png = frontier_png(points, y, label)
        if png is not None:
            doc.add(Image(name, png, f"L0 vs {y} across runs"))
        elif y == "fvu":
            doc.add(Para("No run has both L0 and FVU yet (evaluate not run).", note=True))
    shown = points[-MAX_FRONTIER_ROWS:]  # the most recent runs; this one is last
    rows = [[p.run_name + (" (this run)" if p.current else ""), fmt(p.metrics.get("l0")),
             fmt(p.metrics.get("fvu")), fmt(p.metrics.get("ce_loss_recovered"))] for p in shown]
    if rows:
        doc.add(Table(["run", "L0", "FVU", "CE loss recovered"], rows))
    if len(points) > len(shown):
        doc.add(Para(f"{len(points) - len(shown)} older runs are on the plot but not in the table.", note=True))


def features_section(doc: Document, inp: ReportInputs, top_n: int) -> None:
    doc.add(Heading(1, "Top features"))
    if inp.dashboard is not None:
        doc.add(Links([("Feature dashboard (all features, sortable and searchable)", "features/index.html")]))
    for hook in inp.hooks:
        rows = inp.features.get(hook)
        if rows is None:
            doc.add(Para(f"{hook}: not run (data/interpret/{hook}/features.parquet missing).", note=True))
            continue
        if not rows:
            names = ", ".join(label for label, _ in FEATURE_COLUMNS)
            doc.add(Para(f"{hook}: the features table has none of the columns {names}.",
                         note=True))
            continue
        header = list(rows[0])
        ranked = next((c for c in FEATURE_RANK if c in header and any(_finite(r[c]) for r in rows)), None)
        doc.add(Para(f"{hook}: top {len(rows)} of {inp.feature_counts.get(hook, len(rows))} features"
                     + (f" by {ranked}" if ranked else "") + "."))
        doc.add(Table(header, [[fmt(r[c]) for c in header] for r in rows]))


def steer_section(doc: Document, inp: ReportInputs) -> None:
    doc.add(Heading(1, "Steering against baselines"))
    if inp.steer is None:
        doc.add(Para("Not run (metrics/steer.json missing).", note=True))
        return
    # The verdict first, with its intervals: it answers the section's question.
    overall = inp.steer.get("overall") if isinstance(inp.steer, dict) else None
    blocks = verdict_blocks(overall) if isinstance(overall, dict) else []
    doc.add(*blocks)
    shown = {("overall", "summary")} if blocks else set()
    texts = sorted((f"{'/'.join(path)}: {v}" for path, v in _iter_text(inp.steer) if path not in shown),
                   key=lambda t: not t.startswith("overall"))[:10]
    if texts:
        doc.add(Bullets(texts))
    # Overall/summary numbers first: they answer "does SAE steering beat the baselines?".
    # Then per-method means (SAE methods next to the baselines), then per-feature detail.
    rank = {"overall": 0, "summary": 0, "methods": 1}
    values = sorted(inp.stage_metrics.get("steer", {}).items(),
                    key=lambda kv: (min((rank.get(k, 2) for k in kv[0]), default=2), kv[0]))
    rows = [["/".join(path), fmt(v)] for path, v in values[:MAX_ROWS_PER_STAGE]]
    if rows:
        doc.add(Table(["metric", "value"], rows))
    for png in inp.steer_pngs:
        doc.add(Image(f"steer_{png.name}", png.read_bytes(), f"steering: {png.stem}"))


def _iter_text(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """String leaves of a JSON object (a stage's verdict lines), up to 20."""
    out: list[tuple[tuple[str, ...], str]] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _iter_text(v, (*path, str(k)))
    elif isinstance(tree, str):
        out.append((path, tree))
    return out[:20]


def missing_section(doc: Document, inp: ReportInputs) -> None:
    if inp.missing:
        doc.add(Heading(1, "Inputs not found"),
                Para("These stages have not produced their outputs in this workspace; their sections say not run.",
                     note=True),
                Bullets(sorted(set(inp.missing))))


def build_document(inp: ReportInputs, top_n: int) -> Document:
    model = inp.manifest.get("model_id") or inp.params.get("model.name", "?")
    title = f"SAE pipeline report: {model} @ {', '.join(inp.hooks)}"
    doc = Document(title)
    run_section(doc, inp)
    setup_section(doc, inp)
    metrics_section(doc, inp)
    curves_section(doc, inp)
    frontier_section(doc, inp)
    features_section(doc, inp, top_n)
    steer_section(doc, inp)
    missing_section(doc, inp)
    return doc
