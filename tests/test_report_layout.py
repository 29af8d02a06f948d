"""What the report puts first and how: results before configuration, definitions one click away, top features
ranked by evidence that survives small counts, only the SAE knobs that apply, the steering summary per method
and per concept, one defined name per dead fraction, and a training curve without an offset axis."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from tracking_fixtures import HOOK, fabricate_workspace

from pipeline.report import build_document, gather
from pipeline.report.document import Document, to_html, to_markdown
from pipeline.report.inputs import top_features
from pipeline.report.plots import curves_figure
from pipeline.report.sections import definition


def to_markdown_blocks(blocks: list) -> str:
    doc = Document("t")
    doc.add(*blocks)
    return to_markdown(doc, "figures")


def _md(ws: Path, params: dict | None = None, top_n: int = 5) -> str:
    return to_markdown(build_document(gather(ws, params or {}, [HOOK], top_n=top_n), top_n=top_n), "figures")


def test_results_come_first_and_configuration_last(tmp_path: Path) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    md = _md(ws)
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[0] == "## Results"
    order = ["## Results", "## Training curves", "## Top features", "## Steering against baselines",
             "## All metrics", "## Configuration", "## Run and environment"]
    assert [heads.index(h) for h in order] == sorted(heads.index(h) for h in order)
    html = to_html(build_document(gather(ws, {}, [HOOK], top_n=5), top_n=5))
    results = html[html.index("<h2>Results</h2>"):html.index("<h2>Training curves</h2>")]
    # Each headline name opens its definition; the definition text is not spread over the first screen.
    assert '<details><summary>fvu</summary><div class="def">Fraction of variance' in results
    assert html.index("<summary>fvu</summary>") < html.index("<h2>Configuration</h2>")


def test_top_features_need_support_and_show_their_tokens(tmp_path: Path) -> None:
    feats = tmp_path / "features.parquet"
    nan = float("nan")
    pl.DataFrame({
        "feature": [0, 1, 2, 3], "fire_count": [2, 400, 0, 60], "frequency": [2e-4, 0.04, 0.0, 6e-3],
        "detection_balanced_accuracy@1": [1.0, 0.7, nan, 0.9], "fuzzing_balanced_accuracy@2": [1.0, 0.7, nan, 0.8],
        "topic_auroc@1": [0.5, 0.8, nan, 0.6], "topic": ["a", "b", None, "c"],
        "example_tokens": [["x"], [" on", "on"], [], [" the", "\n", " the"]],
        "topic_auroc_ci95_low@1": [0.4, 0.75, nan, 0.55], "topic_auroc_ci95_high@1": [0.6, 0.85, nan, 0.65],
        "explanation": ["two tokens", "b", None, "c"], "top_tokens": [["lens"]] * 4,
    }).write_parquet(feats)
    rows, count, how = top_features(feats, 4)
    # The perfect score on 2 tokens is chance: it ranks below every supported feature; dead is last.
    assert [r["feature"] for r in rows] == [3, 1, 0, 2] and count == 4
    assert "ranked by interpretability" in how and "at least 20 tokens" in how
    assert rows[0]["fires on"] == 60 and rows[0]["fuzzing"] == 0.8
    assert rows[1]["example tokens"] == "\u2423on  on" and rows[0]["example tokens"] == "\u2423the \u00d72  \u21b5"
    ws = fabricate_workspace(tmp_path / "ws")
    (ws / "data" / "interpret" / HOOK / "features.parquet").write_bytes(feats.read_bytes())
    md = _md(ws)
    assert "| 3 | 60 | 0.006 | 0.9 | 0.8 | 0.600 [0.550, 0.650] | c | \u2423the \u00d72  \u21b5 | c |" in md
    assert "top_tokens" not in rows[0]  # logit-lens fragments stay on the dashboard


def test_only_the_knobs_of_the_trained_architecture(tmp_path: Path) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    cfg = {"architecture": "topk", "d_in": 64, "d_sae": 512, "k": 32, "hook": HOOK, "l1_coeff": 5.0,
           "jumprelu_bandwidth": 0.001, "hidden_sizes": [128, 32], "aux_coeff": 0.03125,
           "training": {"lr": 0.002, "batch_size": 1024}}
    (ws / "models" / "sae" / HOOK / "cfg.json").write_text(json.dumps(cfg))
    manifest = ws / "data" / "activations" / "train" / HOOK / "manifest.json"
    manifest.write_text(json.dumps({"model_id": "smollm2-135m", "revision": None, "weights_hash": "abc"}))
    md = _md(ws, {"model.revision": "main"})
    config = md[md.index("## Configuration"):]
    assert "| model revision | main |" in config  # not "None": a packaged model has no hub revision
    assert "| k | 32 |" in config and "| aux_coeff | 0.03125 |" in config
    assert "| l1_coeff |" not in config and "| jumprelu_bandwidth |" not in config and "| hidden_sizes |" not in config
    assert "Not used by topk, so not shown: hidden_sizes, jumprelu_bandwidth, l1_coeff." in config
    assert "| lr | 0.002 |" in config  # the training loop the SAE was trained with


def test_steering_is_summarised_per_method_and_per_concept(tmp_path: Path) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    per_method = {m: {"coefficient": c, "test": {"hm@2": h, "concept@2": 0.3}} for m, c, h in
                  (("add", 2.0, 0.2), ("dim", 8.0, 0.25))}
    steer = {"features": {str(f): {"topic": t, "fire_rate@2": 0.01, "methods": per_method}
                          for f, t in ((116, "Mathematics"), (3737, "Geography"))},
             "methods": {"add": {"hm@2": 0.2, "fluency@2": 0.5}, "dim": {"hm@2": 0.25, "fluency@2": 0.4}},
             "likelihood": {"methods": {"sae_input": {"lik_effect@1": {"mean": 0.3, "ci95_low": 0.1, "ci95_high": 0.5}}},
                            "verdict_text": "a long sentence " * 10},
             "overall": {"summary": "SAE steering is what it is."}}
    (ws / "results" / "steer.json").write_text(json.dumps(steer))
    md = _md(ws)
    section = md[md.index("## Steering against baselines"):md.index("## All metrics")]
    assert "| method | hm@2 | fluency@2 |" in section and "| dim | 0.250 | 0.400 |" in section
    assert "| feature 116 (Mathematics) | 0.200 | 2 | 0.250 | 8 |" in section
    assert section.count("0.300") == 1 and "[0.100, 0.500]" in section  # the likelihood estimate, shown once
    assert "features/116" not in md  # no per-feature dump anywhere
    from pipeline.report.steer_summary import steer_summary_blocks

    kept = to_markdown_blocks(steer_summary_blocks(steer, skip=("likelihood",)))
    assert "sae_input" not in kept and "| dim | 0.250 | 0.400 |" in kept  # a block rendered elsewhere is left out
    assert md.index("SAE steering is what it is.") < md.index("## Training curves")  # the verdict is a result
    assert md.index("Steering, likelihood evidence: a long sentence") < md.index("## Training curves")


def test_each_dead_fraction_has_its_own_definition() -> None:
    names = ["dead_fraction@2", "dead_fraction@1", "val_dead_fraction@1", "dead_fraction_window@1",
             "interpret_dead_fraction@1"]
    defs = [definition(n) for n in names]
    assert all(defs) and len(set(defs)) == len(defs), defs
    assert "validation" in defs[2] and "train.dead_window_tokens" in defs[3] and "interpret" in defs[4]


def test_constant_l0_curve_has_no_offset_axis() -> None:
    # Batch L0 of a TopK SAE: 32 but for a few BOS tokens (matplotlib alone labels these ticks 0.004 + 3.1995e1).
    fig = curves_figure({"l0": [[0, 31.995], [1, 31.9999], [2, 32.0]], "loss": [[0, 1.0], [1, 0.5], [2, 0.4]]}, "h")
    fig.canvas.draw()
    assert [ax.yaxis.get_major_formatter().offset for ax in fig.axes] == [0, 0]
    assert all(float(t.get_text().replace("\u2212", "-")) >= 29 for t in fig.axes[1].get_yticklabels() if t.get_text())
    flat = curves_figure({"l0": [[0, 32.0], [1, 32.0]]}, "h")
    lo, hi = flat.axes[0].get_ylim()
    assert lo < 32 < hi and hi - lo > 1  # a constant is drawn as a flat line with a readable range


def test_results_lead_with_the_likelihood_evidence(tmp_path: Path) -> None:
    # The likelihood evidence is the primary steering result: its sentence comes before the generated-text verdict
    # (labelled as the secondary view), and each method's effect is a row of the results table.
    ws = fabricate_workspace(tmp_path / "ws")
    steer = {"likelihood": {"methods": {m: {"lik_effect@1": {"mean": v, "ci95_low": v - 0.1, "ci95_high": v + 0.1}}
                                        for m, v in (("sae_input", 0.375), ("dim", 0.596), ("random_latent", 0.062))},
                            "verdict_text": "input-chosen SAE latents beat random latents"},
             "overall": {"summary": "SAE steering is what it is."}}
    (ws / "results" / "steer.json").write_text(json.dumps(steer))
    md = _md(ws)
    results = md[md.index("## Results"):md.index("## Training curves")]
    assert results.index("Steering, likelihood evidence: input-chosen") < results.index(
        "Steering, generated text (secondary view): SAE steering is what it is.")
    assert "lik_effect (SAE, input-chosen)" in results and "0.375" in results
    assert "lik_effect (diff-in-means)" in results and "0.596" in results
    assert "steer/likelihood/methods/random_latent/lik_effect@1/mean" in results
