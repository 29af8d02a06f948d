"""The whole ``sae steer`` stage on a tiny model in a temporary workspace (prepare + extract via their CLIs)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from stage_workspace import invoke, prepared_workspace, sets

from pipeline.steering.verdict import VERDICTS
from stages.cli import main

HOOK = "layers.1.resid_post"
PROMPTS = "steer.prompts=['The music was', 'I cooked a', 'We saw the planet', 'It is']"
FAST = [PROMPTS, "steer.max_new_tokens=6", "steer.coefficients=[0.0, 2.0, 6.0]", "steer.n_features=2",
        "steer.ablation_contexts=2", "steer.lexicon_min_count=3"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, labelled_corpus: Path) -> Path:
    """prepare + extract + a saved SAE, once for the module."""
    ws = tmp_path_factory.mktemp("steer-ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        prepared_workspace(ws, tiny_llama, labelled_corpus, HOOK, arch="relu_l1")  # a random relu SAE
    return ws


@pytest.fixture()
def workspace(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(prepared)
    return prepared


def test_steer_stage_writes_everything_and_is_repeatable(workspace: Path) -> None:
    invoke("steer", *sets(FAST))
    gen = pl.read_parquet("data/steer/generations.parquet")
    # 2 features x 4 prompts x (1 unsteered + 4 methods x 3 coefficients)
    assert gen.height == 2 * 4 * (1 + 4 * 3)
    assert set(gen["method"].unique()) == {"none", "add", "clamp", "dim", "random"}
    assert set(gen["split"].unique()) == {"validation", "test"}
    assert (gen["token_ids"].list.len() == 6).all()
    for k in ("concept_act@2", "topic_score@2", "perplexity@2", "fluency@2", "hm@2", "kl@2", "other_features@2"):
        assert gen[k].is_not_null().all() and gen[k].is_finite().all(), k
    none = gen.filter(pl.col("method") == "none")
    assert (none["kl@2"] == 0).all() and (none["fluency@2"] == 1).all()
    # A strong additive push changes the prompt's next-token distributions; coefficient 0 does not.
    add = gen.filter(pl.col("method") == "add")
    assert (add.filter(pl.col("coefficient") == 0.0)["kl@2"] == 0).all()
    assert (add.filter(pl.col("coefficient") == 6.0)["kl@2"] > 0).all()
    m = json.loads(Path("results/steer.json").read_text())
    assert len(m["features"]) == 2
    for entry in m["features"].values():
        assert set(entry["methods"]) == {"add", "clamp", "dim", "random"}
        assert entry["methods"]["add"]["coefficient"] in (0.0, 2.0, 6.0)
        assert "ablation_effect@2" in entry and entry["ablation_dloss_nofire@2"] in (0.0, None)
    assert set(m["methods"]) == {"add", "clamp", "dim", "random"}
    ov = m["overall"]
    assert ov["sae_method"] in ("add", "clamp") and "dim" in ov["summary"]
    assert ov["bootstrap"]["test_prompts"] == 2 and ov["bootstrap"]["features"] == 2
    assert set(ov["test_hm@2"]) == {"add", "clamp", "dim", "random"}
    for b in ("dim", "random"):  # every verdict comes with its interval
        d = ov[f"sae_minus_{b}_hm@3"]
        assert d["ci95_low"] <= d["mean"] <= d["ci95_high"]
        assert d["verdict"] in VERDICTS and d["verdict"] in ov["summary"]
    assert "runtime" not in m  # wall-clock numbers would break exact reproduction of metrics
    rt = json.loads(Path("reports/steer/runtime.json").read_text())
    assert rt["generations"] == gen.height and rt["generated_tokens"] == gen.height * 6
    assert 0.0 <= m["topic_model_accuracy@1"] <= 1.0
    # The likelihood evidence (default on): every label a concept, one row per (concept, method, coefficient, text).
    lik = m["likelihood"]
    assert lik["n_concepts"] == 3 and set(lik["concepts"]) == {"astronomy", "cooking", "music"}, lik.get("notes_text")
    assert isinstance(lik["verdict_text"], str) and "Holm" in lik["verdict_text"]
    assert all(d["verdict"] in VERDICTS for d in lik["comparisons"].values()) and len(lik["comparisons"]) == 14
    lt = pl.read_parquet("data/steer/likelihood.parquet")
    assert lt.height == 3 * 5 * 4 * lik["n_test_texts"] and (lt.filter(pl.col("coefficient") == 0)["lik_kl@1"] == 0).all()
    assert rt["likelihood_s"] > 0
    # Only current steering versions: no name the special-token exclusion retired is written anywhere.
    from pipeline.metric_names import STEERING_EXCLUDING_SPECIAL

    def keys(node: object) -> set[str]:
        return {k for key, v in node.items() for k in (key, *keys(v))} if isinstance(node, dict) else set()

    written = keys(m) | set(gen.columns) | {c for f in Path("plots/steer").rglob("*.csv") for c in pl.read_csv(f).columns}
    assert not written & set(STEERING_EXCLUDING_SPECIAL), written & set(STEERING_EXCLUDING_SPECIAL)
    assert {"scale@2", "write_norm@2", "fire_rate@2", "sae_hm@3", "unsteered_concept@2"} <= written
    assert sorted(p.name for p in Path("plots/steer/frontier").iterdir()) == ["add.csv", "clamp.csv", "dim.csv", "random.csv"]
    assert pl.read_csv("plots/steer/frontier/add.csv").columns == ["concept@2", "fluency@2", "coefficient"]
    concept = pl.read_csv("plots/steer/concept.csv")
    assert concept.columns == ["coefficient", "add", "clamp", "dim", "random"]
    assert concept["coefficient"].to_list() == [0.0, 2.0, 6.0] and concept["add"].is_not_null().all()
    for png in ("concept_vs_coefficient", "fluency_vs_coefficient", "frontier"):
        assert Path(f"reports/steer/{png}.png").read_bytes()[:4] == b"\x89PNG"
    # Seeded CPU runs repeat bit for bit.
    invoke("steer", *sets(FAST))
    again = pl.read_parquet("data/steer/generations.parquet")
    assert again.equals(gen)
    assert pl.read_parquet("data/steer/likelihood.parquet").equals(lt)
    assert json.loads(Path("results/steer.json").read_text()) == m  # bootstrap intervals included


def test_dvc_steer_plots_name_every_steering_method() -> None:
    """dvc.yaml is static YAML: its per-method plot series must follow the one list of methods."""
    import yaml

    from pipeline.params.analysis import BASELINES, SAE_METHODS, STEER_METHODS

    dvc = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    plots = {k: v for entry in dvc["plots"] for k, v in entry.items()}
    for csv in ("plots/steer/concept.csv", "plots/steer/fluency.csv"):
        assert plots[csv]["y"] == list(STEER_METHODS), csv
    assert set(SAE_METHODS) | set(BASELINES) == set(STEER_METHODS) and not set(SAE_METHODS) & set(BASELINES)


def test_steer_stage_listed_features_generated_positions_and_errors(workspace: Path) -> None:
    invoke("steer", *sets(FAST + ["steer.features=[1, 5]", "steer.methods=[add, clamp]",
                                    "steer.positions=generated", "steer.do_sample=true"]))
    gen = pl.read_parquet("data/steer/generations.parquet")
    assert sorted(gen["feature"].unique().to_list()) == [1, 5]
    assert set(gen["method"].unique()) == {"none", "add", "clamp"}
    fluency = pl.read_csv("plots/steer/fluency.csv")  # methods not run: empty columns, same header
    assert fluency.columns == ["coefficient", "add", "clamp", "dim", "random"] and fluency["dim"].is_null().all()
    assert not Path("plots/steer/frontier/dim.csv").exists()  # no stale series from the previous run
    # 'generated' steers from the last prompt token only: KL averages over that one position.
    assert gen["kl@2"].is_finite().all()
    res = CliRunner().invoke(main, ["steer", "--set", "steer.hook=layers.0.resid_post"])
    assert res.exit_code == 2 and "steer.hook" in res.output
    res = CliRunner().invoke(main, ["steer", *sets(FAST + ["steer.features=[9999]"])])
    assert res.exit_code == 2 and "steer.features" in res.output
    torch.manual_seed(0)  # leave global RNG state predictable for other tests


def test_steer_benchmark_times_the_stage_in_fresh_processes_and_bits_repeat(prepared: Path, tmp_path: Path) -> None:
    """benchmarks/steer.py: two `sae steer` processes on a scratch copy of a finished workspace (never
    written): wall seconds, the stage's breakdown, and the same results bit for bit."""
    from bench_load import load_benchmark

    before = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    report = load_benchmark("steer").main(["--workspace", str(prepared), "--repeats", "2",
                                           "--out", str(tmp_path / "b.json"), *sets(FAST)])
    assert report["bits_repeat"] is True and len(report["runs"]) == 2
    assert all(r["wall_s"] > 0 and r["runtime"]["likelihood_s"] > 0 for r in report["runs"])
    assert json.loads((tmp_path / "b.json").read_text())["sets"] == FAST
    assert sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file()) == before
