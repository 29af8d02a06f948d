"""The README's offline example: `dvc repro` on an SAE this pipeline did not train (written by sae-lens itself),
with `train` importing it: evaluate, interpret, steer and report run unchanged; provenance lands in the lock,
the metrics and the MLflow run; a bad source stops with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from e2e import make_repo, run
from test_e2e_pipeline import HOOK, pipeline_params

pytestmark = pytest.mark.slow
SAE_DIR = "published/tiny-topk"


def write_saelens_sae(folder: Path, model: Path, d_in: int) -> None:
    """A TopK SAE on the tiny model's layer 1 residual stream, saved by sae-lens (random weights, b_dec set)."""
    import sae_lens

    cfg = sae_lens.TopKSAEConfig(d_in=d_in, d_sae=4 * d_in, k=4)
    cfg.metadata.hook_name, cfg.metadata.model_name = "blocks.1.hook_resid_post", str(model)
    sae = sae_lens.TopKSAE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sae.save_model(folder)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, labelled_corpus: Path) -> Path:
    params = pipeline_params(tiny_llama, labelled_corpus)
    params["sae"].update(source=SAE_DIR, source_format="auto")
    repo = make_repo(tmp_path_factory.mktemp("e2e-published") / "repo", params)
    write_saelens_sae(repo / SAE_DIR, tiny_llama, 32)
    run(["git", "add", SAE_DIR], repo)
    run(["git", "commit", "-qm", "a published SAE"], repo)
    run(["dvc", "repro"], repo)
    return repo


def test_repro_with_an_imported_sae_runs_every_analysis(repo: Path) -> None:
    assert not (repo / "checkpoints" / HOOK / "state.pt").exists()  # nothing trained
    prov = json.loads((repo / "models/sae" / HOOK / "provenance.json").read_text())
    assert prov["format"] == "saelens" and prov["source_hook"] == "blocks.1.hook_resid_post"
    assert prov["reference"] == {"kind": "local", "path": SAE_DIR}
    for path in ["results/evaluate.json", f"data/interpret/{HOOK}/features.parquet", "reports/features/index.html",
                 "data/steer/generations.parquet", "reports/summary.md"]:
        assert (repo / path).is_file(), path
    import yaml

    train = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    assert train["params"]["params.yaml"]["sae"]["source"] == SAE_DIR  # the param, and the imported files' hash:
    assert any(o["path"] == "models/sae" and o["md5"].endswith(".dir") for o in train["outs"])


def test_provenance_reaches_the_mlflow_run(repo: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    (r,) = mlflow.search_runs(experiment_names=["sae-pipeline"], output_format="list")
    assert r.data.params["sae.source"] == SAE_DIR
    assert r.data.tags[f"source.{HOOK}.format"] == "saelens"
    assert r.data.tags[f"source.{HOOK}.sha256.sae_weights.safetensors"]


def test_noop_repro_then_a_bad_source_is_one_line(repo: Path) -> None:
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
    res = run(["sae", "train", "--set", "sae.source=published/missing"], repo, check=False)
    assert res.returncode == 2
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: sae.source:") and "published/missing" in line
    res = run(["sae", "train", "--set", "extract.hooks=[layers.2.resid_post]"], repo, check=False)
    assert res.returncode == 2 and "reads layers.1.resid_post (blocks.1.hook_resid_post)" in res.stderr
