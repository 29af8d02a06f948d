"""DVC metrics are a flat headline of numbers; a stage's full results go to results/<stage>.json."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.headline import HEADLINE, HOOK, headline, write_stage_results

ROOT = Path(__file__).resolve().parents[1]
H1, H2 = "layers.9.resid_post", "layers.3.mlp_out"
ENV = {"cpu": "Intel(R) Xeon(R) Processor", "threads": "2"}
# Shaped like the default run's results (keys and nesting as the stages write them, values made up).
RESULTS = {
    "prepare": {"contexts": {"train": 7373}, "tokens": {"train": 943744, "validation": 104832}, "documents": 9862,
                "corpus": "Wikipedia summaries", "environment": ENV},
    "extract": {"tokens": {"train": 943744}, "hooks": {H1: {"mean_norm": 142.3}}, "environment": ENV},
    "train": {H1: {"loss": 47.3, "l0@1": 32.0, "steps": 2048, "val_fvu@2": 0.127}, "environment": ENV},
    "evaluate": {H1: {"fvu@2": 0.128, "fvu@3": 0.133, "l0@1": 32.0, "l0@2": 31.99, "ce_loss_recovered@1": 0.978,
                      "ce_loss_recovered@2": 0.981, "dead_fraction@2": 0.0245, "kl_div@2": 0.26},
                 H2: {"fvu@3": 0.2, "l0@2": 30.0, "ce_loss_recovered@2": None, "dead_fraction@2": math.nan},
                 "environment": ENV},
    "interpret": {H1: {"mean_explanation_score@1": 0.68, "explainer": "stats", "median_topic_auroc@1": 0.54},
                  "environment": ENV},
    "steer": {"features": {"116": {"fire_rate@2": 0.03}}, "likelihood": {
        "verdict_text": "...", "methods": {"sae_input": {"lik_effect@1": {"mean": 0.42, "ci95_low": 0.1}},
                                           "random_latent": {"lik_effect@1": {"mean": 0.01}}}}, "overall": {
        "sae_hm@3": 0.191, "sae_method": "clamp", "summary": "SAE 'clamp' steering ... " * 20,
        "sae_minus_random_hm@3": {"mean": 0.066, "ci95_low": 0.038, "ci95_high": 0.098, "verdict": "beats"}},
        "environment": ENV},
    "bench": {H1: {"sae_top_1_test_accuracy@1": 0.71, "sae_top_1_test_accuracy@1_ci_low": 0.6, "absorption_letters@1": 4,
                   "mean_absorption_fraction@1": 0.05, "per_label": {"music": {"sae_top_1_test_accuracy@1": 0.8}}},
              "environment": ENV},
}


def test_headline_is_flat_numbers_named_by_their_versioned_keys() -> None:
    got = {stage: headline(stage, r, [H1, H2]) for stage, r in RESULTS.items()}
    assert got == {
        "prepare": {},
        "extract": {},
        "train": {},
        # the highest version of each base name; the second hook's under its own name; null/NaN left out
        "evaluate": {"fvu@3": 0.133, "l0@2": 31.99, "ce_loss_recovered@2": 0.981, "dead_fraction@2": 0.0245,
                     f"{H2}/fvu@3": 0.2, f"{H2}/l0@2": 30.0},
        "interpret": {"mean_explanation_score@1": 0.68},
        "steer": {"lik_effect@1": 0.42, "sae_hm@3": 0.191},
        "bench": {"sae_top_1_test_accuracy@1": 0.71},
    }


def test_headline_base_names_are_unique_across_stages() -> None:
    """DVC prefixes a metric name that two files share with the file path: a wide column."""
    names = [alias or path[-1] if path[-1] not in ("mean",) else path[-2]
             for entries in HEADLINE.values() for path, alias in entries]
    assert len(names) == len(set(names)), names
    assert all(path and (path[0] != HOOK or len(path) > 1) for e in HEADLINE.values() for path, _ in e)


def test_write_stage_results_writes_both_files(tmp_path: Path) -> None:
    assert write_stage_results("train", RESULTS["train"], [H1], root=tmp_path) == {}
    assert json.loads((tmp_path / "metrics/train.json").read_text()) == {}  # a DVC metric file all the same
    head = write_stage_results("steer", RESULTS["steer"], root=tmp_path)
    assert json.loads((tmp_path / "results/steer.json").read_text()) == RESULTS["steer"]
    assert json.loads((tmp_path / "metrics/steer.json").read_text()) == head == {"lik_effect@1": 0.42, "sae_hm@3": 0.191}


def test_frontier_reads_the_flat_headline_and_older_nested_files() -> None:
    from pipeline.frontier import frontier_points

    def entry(rev: str, metrics: dict) -> dict:
        data = {"params": {"params.yaml": {"data": {"extract": {"hooks": [H1, H2]}}}},
                "metrics": {"metrics/evaluate.json": {"data": metrics}}}
        return {"rev": rev, "name": rev, "data": data, "experiments": None}

    show = [entry("new", headline("evaluate", RESULTS["evaluate"], [H1, H2])),
            entry("old", {H1: {"l0@1": 16.0, "fvu@2": 0.3, "ce_loss_recovered@1": 0.9}})]
    got = {(p.name, p.hook): (p.l0, p.fvu, p.ce_recovered) for p in frontier_points(show)}
    assert got == {("new", H1): (31.99, 0.133, 0.981), ("new", H2): (30.0, 0.2, None), ("old", H1): (16.0, 0.3, 0.9)}


def _scaled(node: object, scale: float) -> object:
    """Every number times ``scale`` (ints stay ints): another run's results."""
    if isinstance(node, dict):
        return {k: _scaled(v, scale) for k, v in node.items()}
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return node
    return round(node * scale) if isinstance(node, int) else node * scale


# The dependencies a `-S sae.k=...` experiment changes: what train and the stages after it write.
RETRAINED = ("models/sae", "data/interpret", "reports/features", "reports/steer", "metrics", "results", "plots")


def _write_lock(repo: Path, k: int) -> None:
    """A dvc.lock as `dvc repro` writes it, every dep hashed: `dvc exp show` shows one column per dep."""
    import hashlib

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    lock: dict = {"schema": "2.0", "stages": {}}
    for name, st in stages.items():
        deps = []
        for d in st.get("deps", []):
            salt = f"{d}{k if d in RETRAINED else ''}"
            md5 = hashlib.md5(salt.encode()).hexdigest() + ("" if Path(d).suffix else ".dir")
            deps.append({"path": d, "hash": "md5", "md5": md5, "size": 1})
        lock["stages"][name] = {"cmd": st["cmd"], "deps": deps}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def _dvc(repo: Path, *args: str, columns: int = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_two_runs_compare_at_200_columns(tmp_path: Path) -> None:
    """With this repository's dvc.yaml and params.yaml, two recorded runs differing in one param:
    `dvc exp show --only-changed` shows every headline column at 200 columns, `dvc metrics diff` is short.
    (Plain `dvc exp show` lists every param and every code dependency, ~230 columns, whatever the metrics.)"""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, repo / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    assert _dvc(repo, "init", "-q").returncode == 0

    def record(k: int, scale: float) -> None:
        p = yaml.safe_load((repo / "params.yaml").read_text())
        p["sae"]["k"] = k
        (repo / "params.yaml").write_text(yaml.safe_dump(p))
        _write_lock(repo, k)
        for stage, results in RESULTS.items():
            write_stage_results(stage, _scaled(results, scale), [H1], root=repo)
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-qm", f"k={k}"], cwd=repo, check=True)

    record(32, 1.0)
    record(16, 0.9)
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]  # DVC shows these stages' metrics
    names = [n for stage in RESULTS if stage in declared for n in headline(stage, RESULTS[stage], [H1])]
    # 186 = 200 less the room an experiment's row label takes beyond "main" ("├── 1a2b3c4 [kempt-flax]").
    shown = _dvc(repo, "exp", "show", "--no-pager", "--only-changed", "-n", "2", columns=186)
    assert shown.returncode == 0, shown.stderr
    header = shown.stdout.splitlines()[1]
    assert max(len(line) for line in shown.stdout.splitlines()) <= 186
    missing = [n for n in names if n not in header.split()]
    assert not missing, f"collapsed at 200 columns: {missing}\n{shown.stdout}"
    diff = _dvc(repo, "metrics", "diff", "HEAD~1")
    assert diff.returncode == 0 and "failed" not in diff.stderr, diff.stderr
    assert max(len(line) for line in diff.stdout.splitlines()) < 120, diff.stdout
    assert "sae_hm@3" in diff.stdout and "environment" not in diff.stdout


@pytest.mark.parametrize("stage", sorted(RESULTS))
def test_headline_values_are_finite_numbers(stage: str) -> None:
    for name, value in headline(stage, RESULTS[stage], [H1, H2]).items():
        assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value), name
