"""Where the pipeline runs: the repository root (DVC_ROOT-aware), git state, package versions."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "dvc", "mlflow", "polars", "pyarrow", "sae-pipeline")
# Paths DVC itself rewrites while the pipeline runs (dvc.lock after every stage, metrics files with
# ``cache: false``); counting them would mark every run dirty.
PIPELINE_WRITTEN = ("dvc.lock", "metrics/", "results/", "plots/", "reports/")


def repo_root(cwd: str | Path | None = None) -> Path:
    """The real repository root.

    ``dvc exp run --queue`` runs stages in a temporary copy under ``.dvc/tmp/exps/`` that is deleted
    afterwards; DVC puts the real root in ``DVC_ROOT``. Outside DVC the
    stage runs from the root, so the working directory is it.
    """
    env = os.environ.get("DVC_ROOT")
    return Path(env).resolve() if env else Path(cwd or os.getcwd()).resolve()


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(root: Path) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false", "dirty_files": "a, b"}``; empty when ``root`` is not in a git repo."""
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:].strip() for line in status.splitlines() if line.strip()]
    changed = [p for p in changed if not p.startswith(PIPELINE_WRITTEN)]
    return {"commit": commit.strip(), "dirty": str(bool(changed)).lower(), "dirty_files": ", ".join(changed)[:2000]}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    import platform

    out["python"] = platform.python_version()
    return out
