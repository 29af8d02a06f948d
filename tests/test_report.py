"""The report stage: renders with nothing, with everything, and with odd feature tables; HTML is self-contained."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from tracking_fixtures import FEATURES, HOOK, fabricate_workspace, minimal_params

from pipeline.metric_names import STEERING_EXCLUDING_SPECIAL
from pipeline.report import build_document, gather
from pipeline.report.document import Document, Image, Table, to_html, to_markdown
from pipeline.report.inputs import top_features
from pipeline.report.plots import curves_png, frontier_png
from pipeline.report.sections import DEFINITIONS, definition, fmt
from pipeline.tracking import RunPoint
from stages.report import command as report_command

NO_TRACKING = ("tracking.enabled=false",)


def run_stage(ws: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> tuple[str, str]:
    monkeypatch.chdir(ws)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    args = ["--params", str(ws / "params.yaml")] + [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(report_command, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return (ws / "reports" / "summary.md").read_text(), (ws / "reports" / "summary.html").read_text()


def assert_self_contained(html: str) -> None:
    srcs = re.findall(r'src="([^"]*)"', html)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), srcs
    assert "<link" not in html and "http://" not in html and "https://" not in html


def test_report_with_no_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "empty"
    ws.mkdir()
    minimal_params(ws)
    (ws / "results").mkdir()
    (ws / "results" / "broken.json").write_text("{not json")  # a half-written or foreign file
    (ws / "results" / "scalar.json").write_text("3")
    md, html = run_stage(ws, monkeypatch, *NO_TRACKING)
    assert "broken" not in md and "scalar" not in md
    for line in ("train: not run (results/train.json missing)", "Not run (results/steer.json missing)",
                 f"{HOOK}: not run (data/interpret/{HOOK}/features.parquet missing)",
                 f"{HOOK}: no trained SAE found (train not run)", "No run has both L0 and FVU yet",
                 "MLflow tracking disabled", "## Inputs not found", "- results/evaluate.json"):
        assert line in md, line
    assert "not run" in html and html.count("<h2>") >= 8
    assert_self_contained(html)
    assert (ws / "reports" / "figures").is_dir()
    assert not (ws / ".sae-cache").exists()  # tracking disabled: nothing pending either


def test_report_with_all_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    md, html = run_stage(ws, monkeypatch, *NO_TRACKING, "report.top_features=5")
    assert "| model | tiny/llama |" in md and "| weights hash | abc123def456 |" in md
    assert "| d_sae | 512 |" in md and "| architecture | topk |" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {HOOK}/fvu@2 | 0.25 |"))
    assert "variance unexplained" in row  # the metrics table carries definitions
    assert "Retired definition" in next(line for line in md.splitlines() if line.startswith(f"| {HOOK}/fvu@1 |"))
    assert f"| fvu | 0.25 | evaluate/{HOOK}/fvu@2 | Fraction of variance" in md
    # Top 5 of 12 by explanation score: features 11..7, highest first.
    feat_rows = [line for line in md.splitlines() if re.match(r"\| \d+ \| 0\.\d+ \| 0\.\d+ \| .* explanation", line)]
    assert [int(r.split("|")[1]) for r in feat_rows] == [11, 10, 9, 8, 7]
    assert "top 5 of 12 features, by score" in md
    assert "- verdict: SAE steering beats the random baseline" in md
    assert "| overall/sae_concept@1 | 0.7 |" in md
    assert "[Feature dashboard (all features, sortable and searchable)](features/index.html)" in md
    assert f"![training curves of {HOOK}](figures/curves_{HOOK}.png)" in md
    figs = {p.name for p in (ws / "reports" / "figures").iterdir()}
    assert {f"curves_{HOOK}.png", "frontier_fvu.png", "frontier_ce.png", "steer_concept.png"} <= figs
    assert (ws / "reports" / "figures" / "frontier_fvu.png").read_bytes()[:4] == b"\x89PNG"
    assert "Inputs not found" not in md and "not run" not in md
    assert html.count("data:image/png;base64,") == len(figs) and 'href="features/index.html"' in html
    assert_self_contained(html)


def test_feature_tables_with_missing_columns(tmp_path: Path) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    feats = ws / "data" / "interpret" / HOOK / "features.parquet"
    pl.DataFrame({"feature": [0, 1, 2], "frequency": [0.1, 0.3, 0.2]}).write_parquet(feats)
    inp = gather(ws, {"model.name": "m"}, [HOOK], top_n=2)
    assert inp.features[HOOK] == [{"feature": 1, "frequency": 0.3}, {"feature": 2, "frequency": 0.2}]
    # The interpret stage's own spelling: versioned score columns, NaN where a feature was not scored.
    pl.DataFrame({"feature": [0, 1, 2], "frequency": [0.1, 0.3, 0.2], "explanation": ["a", "b", "c"],
                  "detection_balanced_accuracy@1": [0.8, float("nan"), 0.9], "topic_auroc@1": [0.5, 0.6, 0.7],
                  "topic": ["x", "y", "z"], "top_tokens": [["t1", "t2"], ["u"], []]}).write_parquet(feats)
    rows, count, how = top_features(feats, 3)
    assert count == 3 and [r["feature"] for r in rows] == [2, 0, 1] and how == "by score"  # NaN last
    assert rows[0] == {"feature": 2, "frequency": 0.2, "score": 0.9, "topic_auroc": 0.7, "best_topic": "z",
                       "explanation": "c"}  # the logit lens's top_tokens are the dashboard's, not the report's
    pl.DataFrame({"something_else": [1]}).write_parquet(feats)
    md = to_markdown(build_document(gather(ws, {}, [HOOK], top_n=2), top_n=2), "figures")
    assert "the features table has none of the columns" in md
    feats.write_bytes(b"not parquet")
    md = to_markdown(build_document(gather(ws, {}, [HOOK], top_n=2), top_n=2), "figures")
    assert f"{HOOK}: not run" in md  # unreadable is reported, not raised


def test_html_escapes_text_and_inlines_images() -> None:
    doc = Document("t <b>")
    doc.add(Table(["a|b", "n"], [[FEATURES[3][2], "1.5"]]), Image("x.png", b"\x89PNG", "alt"))
    html = to_html(doc)
    assert "<script>" not in html and "&lt;script&gt;" in html and "t &lt;b&gt;" in html
    assert 'src="data:image/png;base64,iVBORw=="' in html and '<td class="num">1.5</td>' in html
    md = to_markdown(doc, "figures")
    assert "| a\\|b | n |" in md and "![alt](figures/x.png)" in md


def test_frontier_and_curves_plots() -> None:
    pts = [RunPoint("a", {"l0": 10.0, "fvu": 0.4}), RunPoint("b", {"l0": 40.0}),
           RunPoint("me", {"l0": 32.0, "fvu": 0.25}, current=True)]
    png = frontier_png(pts)
    assert png is not None and png[:4] == b"\x89PNG" and png == frontier_png(pts)  # deterministic bytes
    assert frontier_png([RunPoint("b", {"l0": 40.0})]) is None
    assert frontier_png(pts, "ce_loss_recovered") is None
    assert curves_png({"loss": [[0, 1.0], [1, 0.5]]}, "h") is not None and curves_png({}, "h") is None


def test_definitions_and_formatting() -> None:
    assert "variance" in definition("fvu@2") and definition("l0@1").startswith("Mean number of active")
    assert definition("fvu_v9") == DEFINITIONS["fvu"] and definition("unknown@1") == ""
    assert "not BOS/EOS/PAD" in definition("fvu@3") and "BOS/EOS/PAD included" in definition("fvu_v2")
    assert "not the FVU" in definition("uncentered_nmse@1")  # renamed from nmse@1; older runs still explained:
    assert definition("nmse@1").startswith("Former name of uncentered_nmse")


def test_both_special_token_variants_are_defined() -> None:
    from pipeline import metrics

    for old, new in metrics.EXCLUDING_SPECIAL.items():
        assert old in DEFINITIONS and new in DEFINITIONS and DEFINITIONS[old] != DEFINITIONS[new], (old, new)
    for old, new in STEERING_EXCLUDING_SPECIAL.items():  # steering statistics without BOS/EOS/PAD
        assert "BOS/EOS/PAD included" in definition(old) and "not BOS/EOS/PAD" in definition(new), (old, new)
    assert "concept@1" in definition("hm@1") and "concept@2" in definition("hm@2")
    assert fmt(12800.0) == "12800" and fmt(0.123456) == "0.1235" and fmt(None) == "—" and fmt(float("nan")) == "nan"


def test_steer_verdict_with_intervals_is_rendered(tmp_path: Path) -> None:
    import json

    ws = fabricate_workspace(tmp_path / "ws")
    diff = {"mean": -0.0298, "ci95_low": -0.2381, "ci95_high": 0.1786, "verdict": "is indistinguishable from", "wins": "1/3"}
    overall = {"sae_method": "add", "sae_hm@3": 0.11,
               "test_hm@2": {"add": {"mean": 0.11, "ci95_low": 0.08, "ci95_high": 0.15},
                             "clamp": {"mean": 0.2, "ci95_low": 0.1, "ci95_high": 0.3},
                             "dim": {"mean": 0.222, "ci95_low": None, "ci95_high": None}},
               "sae_minus_dim_hm@3": diff,
               "bootstrap": {"scheme": "two-way percentile bootstrap", "resamples": 10000, "seed": 0,
                             "test_prompts": 10, "features": 3},
               "summary": "SAE 'add' steering (chosen on validation hm@2): test hm@2 0.110; is indistinguishable "
                          "from 'dim' (95% CI of the difference includes 0: difference -0.030, 95% CI [-0.238, +0.179])"}
    (ws / "results" / "steer.json").write_text(json.dumps({"features": {"3": {"topic": "music"}}, "overall": overall}))
    md = to_markdown(build_document(gather(ws, {}, [HOOK], top_n=2), top_n=2), "figures")
    section = md[md.index("# Steering against baselines"):]
    assert overall["summary"] in section and section.count("95% CI of the difference includes 0") == 1  # once
    assert "| hm@2 | add | SAE (chosen on validation) | 0.110 | [0.080, 0.150] |" in section
    assert "| hm@2 | clamp | SAE | 0.200 | [0.100, 0.300] |" in section
    assert "| hm@2 | dim | baseline | 0.222 | — (fewer than 2 test prompts) |" in section
    assert "| hm@2 | add − dim | -0.030 | [-0.238, 0.179] | is indistinguishable from | 1/3 |" in section
    assert "10000 resamples, seed 0, 10 test prompts x 3 features" in section
    assert "Test hm@2 of the SAE method (add or clamp) chosen on validation" in definition("sae_hm@3")
