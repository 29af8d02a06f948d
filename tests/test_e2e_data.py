"""`dvc repro` of the data stages in a temporary git repository, for real."""

from __future__ import annotations

import json
from pathlib import Path

from e2e import make_repo, run

from pipeline.activations import open_activations
from pipeline.testing import tiny_params


def test_dvc_repro_prepare_extract(tmp_path: Path, tiny_llama: Path, labelled_corpus: Path) -> None:
    repo = make_repo(tmp_path / "repo", tiny_params(tiny_llama, labelled_corpus, ["embed", "layers.2.resid_post"]))
    run(["dvc", "repro", "extract"], repo)
    for split in ("train", "validation"):
        for hook in ("embed", "layers.2.resid_post"):
            ds = open_activations(repo / "data/activations" / split / hook, verify=True)
            assert ds.n_tokens > 0 and ds.d_model == 32
    assert json.loads((repo / "results/prepare.json").read_text())["labels"] == 3
    lock = (repo / "dvc.lock").read_text()
    assert "extract:" in lock and "data/activations" in lock
    # Nothing changed: a second repro runs nothing.
    again = run(["dvc", "repro", "extract"], repo)
    assert "didn't change" in again.stdout or "up to date" in again.stdout.lower()
    # A param change reruns extract only.
    run(["dvc", "repro", "extract", "-f", "-s"], repo)
