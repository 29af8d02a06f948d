"""The report's sections, built from :class:`~pipeline.report.inputs.ReportInputs` as document blocks."""

from __future__ import annotations

import math
from typing import Any

from pipeline.metric_names import DEFINITIONS
from pipeline.report.bench import bench_section
from pipeline.report.document import Bullets, Document, Fold, Heading, Image, Links, Para, Table
from pipeline.report.inputs import FEATURE_COLUMNS, ReportInputs
from pipeline.report.plots import curves_png, frontier_png
from pipeline.report.setup import environment_section, setup_section
from pipeline.report.steer import likelihood_blocks, verdict_blocks
from pipeline.report.steer_summary import steer_summary_blocks
from pipeline.tracking.names import metric_base

STAGES = ("prepare", "extract", "train", "evaluate", "interpret", "steer")
MAX_ROWS_PER_STAGE = 40
MAX_FRONTIER_ROWS = 30
FEATURE_LABELS = {"score": "detection", "topic_auroc": "topic AUROC [95% CI]", "best_topic": "topic"}
# The results a reader compares first, after the headline L0 / FVU / CE loss recovered: (stage, metric base name).
KEY_RESULTS = (("evaluate", "dead_fraction"), ("evaluate", "kl_div"), ("interpret", "mean_explanation_score"),
               ("interpret", "median_topic_auroc"), ("bench", "sae_top_1_test_accuracy"),
               ("bench", "llm_top_1_test_accuracy"), ("steer", "sae_hm"), ("steer", "sae_concept_gain"))
# The likelihood evidence's effect per steering method, the steering stage's primary result (results/steer.json:
# likelihood/methods/<method>/lik_effect@N/mean): (method, row label).
LIKELIHOOD_ROWS = (("sae_input", "lik_effect (SAE, input-chosen)"), ("sae_output", "lik_effect (SAE, output-chosen)"),
                   ("dim", "lik_effect (diff-in-means)"), ("random_latent", "lik_effect (random latent)"))


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
    """The definition of ``name`` (e.g. ``fvu@2``): its exact version's entry, else its base name's; a training
    validation value (``val_fvu@2``) is its metric's definition on the in-training validation tokens."""
    base, version = metric_base(name)
    exact = DEFINITIONS.get(f"{base.lower()}@{version}") if version is not None else None
    found = exact or DEFINITIONS.get(base.lower(), "")
    if not found and base.lower().startswith("val_"):
        inner = definition(name[4:])
        return f"Training, last validation (train.val_tokens validation tokens): {inner}" if inner else ""
    return found


def _find(stage_metrics: dict[str, dict[tuple[str, ...], float]], stage: str, base: str,
          hook: str | None) -> tuple[str, float] | None:
    """The value of metric ``base`` in ``stage``: under ``hook`` if there, the highest version -> (key, value)."""
    cands = [(hook is not None and hook in path[:-1], metric_base(path[-1])[1] or 0, len(path) == 1, path, v)
             for path, v in stage_metrics.get(stage, {}).items() if metric_base(path[-1])[0].lower() == base]
    if not cands:
        return None
    # Ties (a summary and its per-label breakdown, both under the hook) go to the shorter path: the summary.
    *_, path, value = max(cands, key=lambda c: (*c[:3], -len(c[3])))
    return "/".join((stage, *path)), value


def results_section(doc: Document, inp: ReportInputs) -> None:
    """What the run achieved, first: headline numbers with their definitions one click away, and the verdicts."""
    doc.add(Heading(1, "Results"))
    rows, defs = [], []
    for name, (v, src) in inp.headline.items():
        rows.append([name, fmt(v), src])
        defs.append(definition(src.split("/")[-1]))
    hook = inp.hooks[0] if inp.hooks else None
    for stage, base in KEY_RESULTS:
        hit = _find(inp.stage_metrics, stage, base, hook)
        if hit is not None:
            rows.append([base, fmt(hit[1]), hit[0]])
            defs.append(definition(hit[0].split("/")[-1]))
    rows_lik, defs_lik = _likelihood_rows(inp.stage_metrics.get("steer", {}))
    rows, defs = rows[:4] + rows_lik + rows[4:], defs[:4] + defs_lik + defs[4:]
    if rows:
        doc.add(Para("Click a name for its definition. Names in 'from' carry their definition version (fvu@2): "
                     "numbers with different versions are not comparable.", note=True),
                Table(["metric", "value", "from"], rows, defs=defs))
    else:
        doc.add(Para("No stage has written its metrics yet.", note=True))
    # The likelihood evidence (matched-KL steering and ablation against baselines) is the primary steering result,
    # so it comes first; the judged generations are the secondary view.
    lik = inp.steer.get("likelihood") if isinstance(inp.steer, dict) else None
    if isinstance(lik, dict) and isinstance(lik.get("verdict_text"), str):
        doc.add(Para(f"Steering, likelihood evidence: {lik['verdict_text']}"))
    overall = inp.steer.get("overall") if isinstance(inp.steer, dict) else None
    if isinstance(overall, dict) and isinstance(overall.get("summary"), str):
        label = "Steering, generated text (secondary view)" if isinstance(lik, dict) else "Steering"
        doc.add(Para(f"{label}: {overall['summary']}"))


def _likelihood_rows(steer: dict[tuple[str, ...], float]) -> tuple[list[list[str]], list[str]]:
    """Rows of :data:`LIKELIHOOD_ROWS` found in the steer stage's flattened results, with their definitions."""
    rows, defs = [], []
    for method, label in LIKELIHOOD_ROWS:
        hits = sorted((metric_base(p[3])[1] or 0, p, v) for p, v in steer.items()
                      if len(p) == 5 and p[:3] == ("likelihood", "methods", method) and p[4] == "mean"
                      and metric_base(p[3])[0] == "lik_effect")
        if hits:
            _, path, value = hits[-1]
            rows.append([label, fmt(value), "/".join(("steer", *path))])
            defs.append(definition(path[3]))
    return rows, defs


def metrics_section(doc: Document, inp: ReportInputs) -> None:
    """Every stage's numbers with their definitions, folded (the results above are the ones to read first)."""
    doc.add(Heading(1, "All metrics"))
    order = [s for s in STAGES if s in inp.stage_metrics] + sorted(set(inp.stage_metrics) - set(STAGES))
    for stage in STAGES:
        if stage not in inp.stage_metrics:
            doc.add(Para(f"{stage}: not run (results/{stage}.json missing).", note=True))
    for stage in order:
        # The steering file's per-feature leaves are summarised in its own section; here its overall numbers.
        values = [(path, v) for path, v in inp.stage_metrics[stage].items()
                  if not (stage == "steer" and path[0] == "features")]
        rows = [["/".join(path), fmt(v)] for path, v in values[:MAX_ROWS_PER_STAGE]]
        fold = Fold(f"{stage} (results/{stage}.json): {len(values)} numbers",
                    [Table(["metric", "value"], rows, defs=[definition(p[-1]) for p, _ in values[:MAX_ROWS_PER_STAGE]])])
        if len(values) > MAX_ROWS_PER_STAGE:
            fold.blocks.append(Para(f"{len(values) - MAX_ROWS_PER_STAGE} more in results/{stage}.json.", note=True))
        doc.add(fold)


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
        doc.add(Para(f"{hook}: top {len(rows)} of {inp.feature_counts.get(hook, len(rows))} features, "
                     f"{inp.feature_ranking.get(hook, 'in table order')}. Detection and fuzzing: balanced accuracy "
                     "of the explanation on held-out examples; example tokens: the token under each top example's "
                     "maximum (\u2423 = a leading space)."))
        # The topic AUROC shown with its interval, in one cell.
        shown = [c for c in header if c not in ("topic_auroc_low", "topic_auroc_high")]
        cells = [[_auroc_cell(r) if c == "topic_auroc" else fmt(r[c]) for c in shown] for r in rows]
        doc.add(Table([FEATURE_LABELS.get(c, c) for c in shown], cells))


def _auroc_cell(row: dict[str, Any]) -> str:
    lo, hi = row.get("topic_auroc_low"), row.get("topic_auroc_high")
    if _finite(row.get("topic_auroc")) and _finite(lo) and _finite(hi):
        return f"{row['topic_auroc']:.3f} [{lo:.3f}, {hi:.3f}]"
    return fmt(row.get("topic_auroc"))


def steer_section(doc: Document, inp: ReportInputs) -> None:
    doc.add(Heading(1, "Steering against baselines"))
    if inp.steer is None:
        doc.add(Para("Not run (results/steer.json missing).", note=True))
        return
    # The verdict first, with its intervals: it answers the section's question. The likelihood evidence
    # (every label, matched KL, ablation) is the primary result; the judged generations follow.
    lik = likelihood_blocks(inp.steer.get("likelihood")) if isinstance(inp.steer, dict) else []
    doc.add(*lik)
    overall = inp.steer.get("overall") if isinstance(inp.steer, dict) else None
    blocks = verdict_blocks(overall) if isinstance(overall, dict) else []
    if lik and blocks:
        doc.add(Para("Secondary view: generated continuations, scored by a topic model and fluency.", note=True))
    doc.add(*blocks)
    shown = {("overall", "summary")} if blocks else set()
    texts = sorted((f"{'/'.join(path)}: {v}" for path, v in _iter_text(inp.steer)
                    if path not in shown and path[0] not in ("features", "settings", "model", "environment", "likelihood")),
                   key=lambda t: not t.startswith("overall"))[:10]
    if texts:
        doc.add(Bullets(texts))
    # Then one row per method and one per concept: the per-feature detail stays in results/steer.json.
    # The likelihood block has its own tables above (likelihood_blocks): not again as generic summaries.
    doc.add(*steer_summary_blocks(inp.steer, skip=("likelihood",) if lik else ()))
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
    def named(hook: str) -> str:  # a transcoder reads its hook and writes hook_out
        cfg = inp.sae_cfgs.get(hook) or {}
        return f"{hook} -> {cfg.get('hook_out')} (transcoder)" if cfg.get("architecture") == "transcoder" else hook

    title = f"SAE pipeline report: {model} @ {', '.join(named(h) for h in inp.hooks)}"
    doc = Document(title)
    r = inp.run
    if r.get("run_name") or r.get("commit"):
        doc.add(Para(f"Run {r.get('run_name', '?')}" + (f", commit {r['commit'][:12]}" if r.get("commit") else "")
                     + ". Results first; configuration and environment at the end.", note=True))
    # Results, then figures, then detail, then what was configured and where it ran.
    results_section(doc, inp)
    curves_section(doc, inp)
    frontier_section(doc, inp)
    features_section(doc, inp, top_n)
    steer_section(doc, inp)
    bench_section(doc, inp.stage_metrics, inp.hooks)
    metrics_section(doc, inp)
    setup_section(doc, inp)
    environment_section(doc, inp)
    missing_section(doc, inp)
    return doc
