"""The small git repository the `sae verify` tests train in: synthetic activations and tiny train params."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, to_dict
from pipeline.synthetic import write_synthetic_activations

HOOK = "layers.1.resid_post"
D = 16


def make_verify_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_dtype: str) -> Path:
    """``tmp_path`` as a git repository (nothing committed) holding train/validation activations of ``HOOK`` and a
    ``params.yaml`` training a TopK SAE on them in ``train_dtype``; the working directory moves there."""
    monkeypatch.chdir(tmp_path)
    for name in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(name, "t@t")
    for split, n, sample in (("train", 1280, 0), ("validation", 320, 1)):
        write_synthetic_activations(Path("data/activations") / split / HOOK, n, D, n_features=24, k_true=2, seed=4,
                                    sample_seed=sample, hook=HOOK, dtype="float16", shard_rows=640, split=split)
    p = to_dict(Params())
    p["extract"]["hooks"] = [HOOK]
    p["sae"].update(arch="topk", expansion=4, k=4)
    p["train"].update(device="cpu", dtype=train_dtype, batch_size=64, n_tokens=None, log_every=4, val_every=8,
                      val_tokens=256, checkpoint_every=0, dead_window_tokens=1024)
    Path("params.yaml").write_text(yaml.safe_dump(p))
    subprocess.run(["git", "init", "-q"], check=True)
    return tmp_path
