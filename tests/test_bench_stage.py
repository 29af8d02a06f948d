"""The ``sae bench`` stage on a tiny model (prepare + extract via their CLIs, a saved SAE), its report section,
and ``sae frontier`` plotting the bench headline against L0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from stage_workspace import invoke, prepared_workspace, sets

from stages.cli import main

HOOK = "layers.1.resid_post"
FAST = ["bench.documents_per_label=20", "bench.k_values=[1, 2, 5]", "bench.bootstrap_resamples=50",
        "bench.absorption_words=200", "bench.absorption_min_letters=20", "bench.core_tokens=512",
        "bench.n_splice_contexts=2", "bench.encode_dtype=float32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, labelled_corpus: Path) -> Path:
    ws = tmp_path_factory.mktemp("bench-ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        prepared_workspace(ws, tiny_llama, labelled_corpus, HOOK, arch="topk", k=4)
        invoke("bench", *sets(FAST))
    return ws


def test_bench_stage_writes_metrics_and_saebench_files(workspace: Path) -> None:
    res = json.loads((workspace / "results/bench.json").read_text())[HOOK]
    for name in ("sae_top_1_test_accuracy@1", "llm_top_5_test_accuracy@1", "sae_l1_top_2_test_accuracy@1",
                 "sae_test_accuracy@1", "llm_test_accuracy@1"):
        assert 0.0 <= res[f"{name}_ci_low"] <= res[name] <= res[f"{name}_ci_high"] <= 1.0
    assert set(res["per_label"]) == {"arts", "science", "sports"} or len(res["per_label"]) == 3
    # A 32-wide random model knows no first letters: one line says so, no absorption number, no file.
    assert "mean_absorption_fraction@1" not in res and res["absorption_note"].count("\n") == 0
    assert "absorption not evaluated" in res["absorption_note"]
    head = json.loads((workspace / "metrics/bench.json").read_text())
    assert all(isinstance(v, float) for v in head.values()) and "sae_top_1_test_accuracy@1" in head
    files = sorted(p.relative_to(workspace).as_posix() for p in (workspace / "eval_results").rglob("*.json"))
    assert files == [f"eval_results/{e}/sae-pipeline_{HOOK}_eval_results.json" for e in ("core", "sparse_probing")]
    core = json.loads((workspace / files[0]).read_text())
    assert core["sae_cfg_dict"]["architecture"] == "topk" and core["sae_cfg_dict"]["d_sae"] == 64
    assert core["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(4.0)


def test_bench_stage_is_repeatable(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace)
    before = (workspace / "results/bench.json").read_text()
    invoke("bench", *sets(FAST))
    after = json.loads((workspace / "results/bench.json").read_text())
    before_json = json.loads(before)
    after.pop("environment"), before_json.pop("environment")
    assert after == before_json


def test_bench_bad_params_are_one_line_errors(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace)
    res = CliRunner().invoke(main, ["bench", "--set", "bench.k_values=[]"])
    assert res.exit_code == 2 and "bench.k_values" in res.output and res.output.count("\n") == 1


def test_report_section_shows_baseline_and_the_absorption_note() -> None:
    from pipeline.report.bench import bench_blocks
    from pipeline.report.document import Para, Table

    values = {"sae_top_1_test_accuracy@1": 0.8, "sae_top_1_test_accuracy@1_ci_low": 0.7,
              "sae_top_1_test_accuracy@1_ci_high": 0.9, "llm_top_1_test_accuracy@1": 0.6,
              "sae_test_accuracy@1": 0.95, "llm_test_accuracy@1": 0.97, "absorption_letters@1": 3.0}
    blocks = bench_blocks(HOOK, values)
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.rows[0][:4] == ["top 1", "0.800 [0.700, 0.900]", "—", "0.600"]
    note = next(b for b in blocks if isinstance(b, Para))
    assert "only 3 of 26" in note.text
    values.update({"mean_absorption_fraction@1": 0.25, "mean_full_absorption@1": 0.1, "mean_num_split_features@1": 1.5})
    assert "mean absorption fraction 0.250" in next(b for b in bench_blocks(HOOK, values) if isinstance(b, Para)).text


def test_frontier_plots_bench_headline_against_l0(tmp_path: Path) -> None:
    from pipeline.frontier import frontier_points, plot_frontier

    def exp(rev: str, k: int) -> dict:
        data = {"rev": rev, "params": {"params.yaml": {"data": {"extract": {"hooks": [HOOK]}}}},
                "metrics": {"metrics/evaluate.json": {"data": {"l0@2": float(k), "fvu@3": 1 / k}},
                            "metrics/bench.json": {"data": {"sae_top_1_test_accuracy@1": 0.5 + k / 100,
                                                            "mean_absorption_fraction@1": 0.1}}}}
        return {"rev": rev, "name": f"k{k}", "data": data, "experiments": None}

    points = frontier_points([exp("a1", 16), exp("b2", 32)])
    assert {p.name: p.extra["sae_top_1_test_accuracy"] for p in points} == pytest.approx({"k16": 0.66, "k32": 0.82})
    out = plot_frontier(points, tmp_path / "f.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_summary_html_has_the_bench_section() -> None:
    from pipeline.report.document import to_html
    from pipeline.report.inputs import ReportInputs
    from pipeline.report.sections import build_document

    inp = ReportInputs(params={}, hooks=[HOOK])
    inp.stage_metrics = {"bench": {(HOOK, "sae_top_1_test_accuracy@1"): 0.8, (HOOK, "llm_top_1_test_accuracy@1"): 0.7,
                                   (HOOK, "sae_test_accuracy@1"): 0.9, (HOOK, "absorption_letters@1"): 9.0}}
    html = to_html(build_document(inp, 5))
    assert "SAEBench-comparable evaluation" in html and "only 9 of 26" in html
