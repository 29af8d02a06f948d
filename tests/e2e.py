"""Helpers for end-to-end tests: a throwaway git + DVC copy of this repository with tiny params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.testing import write_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    """The venv's bin first on PATH (dvc.yaml calls `sae`), offline, quiet, no analytics."""
    e = dict(os.environ)
    # mlflow.set_tracking_uri in an earlier test of this process also writes $MLFLOW_TRACKING_URI: a stage run
    # here must log to its own repository's store, not that one.
    e.pop("MLFLOW_TRACKING_URI", None)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t",
             GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", SAE_LOG_LEVEL="WARNING")
    return e


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def project_files() -> list[str]:
    """Files git would commit (tracked + untracked-not-ignored), so the copy matches a fresh clone."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    skip = ("data/", "models/", "metrics/", "results/", "plots/", "checkpoints/", "reports/")
    return [f for f in out if f and not f.startswith(skip) and (REPO_ROOT / f).is_file()]


def make_repo(dest: Path, params: dict) -> Path:
    """Copy the project into ``dest``, write ``params``, commit it in a fresh git repo."""
    for f in project_files():
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / f, target)
    write_params(dest / "params.yaml", params)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest
