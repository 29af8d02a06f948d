"""New dictionaries end to end: `dvc exp run -S sae.arch=...` on a fresh copy of the project (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e import make_repo, run
from test_e2e_pipeline import HOOK, pipeline_params

pytestmark = pytest.mark.slow


def test_dvc_exp_run_trains_and_evaluates_a_matryoshka_sae(tmp_path: Path, tiny_llama: Path,
                                                           labelled_corpus: Path) -> None:
    params = pipeline_params(tiny_llama, labelled_corpus)
    params["sae"]["matryoshka_fractions"] = [0.25, 0.75]  # d_sae 4 x 64: groups of 64 and 192 latents
    repo = make_repo(tmp_path / "repo", params)
    run(["dvc", "exp", "run", "-S", "sae.arch=matryoshka_batchtopk", "-n", "matryoshka"], repo)
    cfg = json.loads((repo / "models/sae" / HOOK / "cfg.json").read_text())
    assert cfg["architecture"] == "matryoshka_batchtopk" and cfg["matryoshka_fractions"] == [0.25, 0.75]
    ev = json.loads((repo / "results/evaluate.json").read_text())[HOOK]  # the full results (metrics/: headline)
    assert 0 < ev["fvu@3"] < 1 and ev["l0@2"] > 0, ev
    shown = run(["dvc", "exp", "show", "--json"], repo).stdout
    assert "matryoshka" in shown
