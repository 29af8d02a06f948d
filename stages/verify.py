"""``sae verify``: rerun a commit's pipeline and compare with the metrics it recorded.

The recorded side is ``git show <rev>:results/<stage>.json`` for every results file the commit holds (the
full results, :mod:`pipeline.headline`; a commit from before that split holds them in ``metrics/``).
The rerun happens in a temporary clone of the repository at that commit (``dvc repro --force`` of
the stages that wrote those files, never ``report``: nothing is logged to MLflow), so the workspace,
its DVC cache and its MLflow store are left alone; ``--no-rerun`` compares the workspace's own
``results/`` instead (after a ``git checkout <rev> && dvc repro --force`` of your own). The
comparison and its tolerances are :mod:`pipeline.verify`; exit code 1 when a metric is out of
tolerance, 2 on a usage error.

First the commit itself is checked (:mod:`pipeline.lockcheck`): when its ``params.yaml`` or code differs
from what its ``dvc.lock`` says the stages ran with, its metrics are not the results of its params, the
drift is named and verify stops with exit code 1 before any rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from pipeline.errors import UserError
from pipeline.lockcheck import LockDrift, lock_drift
from pipeline.numerics import child_environ
from pipeline.verify import compare, format_report, format_tolerances
from stages.common import log, run_user_errors

RESULTS = Path("results")
LEGACY = Path("metrics")  # where commits from before the headline split keep their full results


def _git(root: Path, *args: str) -> str:
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"git {' '.join(args)}: {(res.stderr.strip().splitlines() or ['failed'])[-1]}")
    return res.stdout


def recorded_metrics(root: Path, rev: str, workspace: bool = False) -> tuple[str, dict[str, Any], bool]:
    """``(commit, {stage: results/<stage>.json at that commit}, False)``. When the commit holds none (a fresh
    clone that ran `dvc repro` without committing it) and ``workspace``: the workspace's ``results/`` of a
    checkout of that commit, ``(commit, {...}, True)``. A UserError when there are none."""
    commit = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
    for folder in (RESULTS, LEGACY):
        names = [n for n in _git(root, "ls-tree", "--name-only", commit, f"{folder.as_posix()}/").split()
                 if n.endswith(".json")]
        if names:
            return commit, {Path(n).stem: json.loads(_git(root, "show", f"{commit}:{n}")) for n in names}, False
    ours = read_metrics(root / RESULTS)
    if workspace and ours and commit == _git(root, "rev-parse", "HEAD").strip():
        return commit, ours, True
    raise UserError(f"--rev {rev}: commit {commit[:7]} has no {RESULTS}/*.json: record a run first (`dvc repro`, "
                    "then `git add dvc.lock metrics results && git commit`), or run `dvc repro` on a checkout of it "
                    "and `sae verify` compares those results with a rerun")


def _git_bytes(root: Path, commit: str, path: str) -> bytes | None:
    res = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True)
    return res.stdout if res.returncode == 0 else None


def commit_drift(root: Path, commit: str, stages: list[str], lock: bytes | None = None) -> LockDrift | None:
    """How the commit's params and code differ from its ``dvc.lock`` (or ``lock``, another run's) for
    ``stages``; None without a dvc.lock."""
    import yaml

    lock = lock if lock is not None else _git_bytes(root, commit, "dvc.lock")
    if lock is None:
        return None

    def read_params(file: str) -> Any:
        data = _git_bytes(root, commit, file)
        return None if data is None else yaml.safe_load(data)

    def list_dir(path: str) -> list[str]:
        return _git(root, "ls-tree", "-r", "--name-only", commit, f"{path.rstrip('/')}/").splitlines()

    return lock_drift(yaml.safe_load(lock) or {}, read_params, lambda p: _git_bytes(root, commit, p), list_dir, stages)


def read_metrics(directory: Path) -> dict[str, Any]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def rerun(root: Path, commit: str, stages: list[str], keep: bool) -> dict[str, Any]:
    """``dvc repro --force <stages>`` in a fresh clone at ``commit``; the metrics it wrote."""
    tmp = Path(tempfile.mkdtemp(prefix="sae-verify-"))
    clone = tmp / "repo"
    ok = False
    try:
        _git(root, "clone", "--quiet", "--no-checkout", str(root), str(clone))
        _git(clone, "checkout", "--quiet", "--detach", commit)
        import yaml

        defined = set((yaml.safe_load((clone / "dvc.yaml").read_text()) or {}).get("stages", {}))
        targets = [s for s in stages if s in defined]
        if not targets:
            raise UserError(f"commit {commit[:7]}: none of the stages {stages} is in its dvc.yaml")
        # The child `sae` processes choose their own numerics from the commit's params (not ours),
        # and run with this interpreter's `sae` first on PATH.
        env = child_environ()
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.pop("DVC_ROOT", None)
        log.info("verify: dvc repro --force %s in %s", " ".join(targets), clone)
        res = subprocess.run(["dvc", "repro", "--force", *targets], cwd=clone, env=env)
        if res.returncode != 0:
            raise UserError(f"dvc repro failed in {clone} (exit {res.returncode}); the clone is kept for inspection")
        ok = True
        return read_metrics(clone / RESULTS) or read_metrics(clone / LEGACY)  # a commit from before the split
    finally:
        if keep or not ok and clone.is_dir() and (clone / "dvc.yaml").is_file():
            log.info("verify: the clone is kept at %s", clone)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@click.command(help="Rerun a commit's pipeline in a temporary clone and compare with the metrics it recorded: "
               "bit-exact where the recorded environment matches, else within each metric's tolerance.")
@click.option("--rev", default="HEAD", show_default=True, help="The commit whose recorded metrics are checked.")
@click.option("--no-rerun", is_flag=True, help="Compare the workspace's results/ (after your own `dvc repro --force`) "
              "instead of rerunning in a temporary clone.")
@click.option("--all", "show_all", is_flag=True, help="List every metric, not only those that moved.")
@click.option("--keep", is_flag=True, help="Keep the temporary clone.")
@click.option("--tolerances", is_flag=True, help="Print the tolerance table and exit.")
def command(rev: str, no_rerun: bool, show_all: bool, keep: bool, tolerances: bool) -> None:
    def body() -> None:
        if tolerances:
            click.echo(format_tolerances())
            return
        root = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel").strip())
        # Nothing committed (a fresh clone after `dvc repro`): the workspace's results are one run of the
        # commit, a rerun in a clone the other.
        commit, recorded, ours = recorded_metrics(root, rev, workspace=not no_rerun)
        lock = None
        if ours:
            lock = (root / "dvc.lock").read_bytes() if (root / "dvc.lock").is_file() else b""
        drift = commit_drift(root, commit, list(recorded), lock) if lock != b"" else None
        what = "the workspace's results" if ours else f"commit {commit[:12]}'s results"
        if drift is not None and not drift.ok:  # the recorded metrics are not the results of this commit
            click.echo(f"sae verify: {what} come from other params or code than commit {commit[:12]} holds:")
            click.echo("\n".join(f"  {line}" for line in drift.describe()))
            click.echo("Nothing compared: its metrics are not the results of its params and code.")
            sys.exit(1)
        now = read_metrics(root / RESULTS) if no_rerun else rerun(root, commit, list(recorded), keep)
        result = compare(recorded, now)
        first = (f"the workspace's results (nothing recorded at {commit[:12]}, the checked-out commit)" if ours
                 else f"metrics recorded at {commit[:12]}")
        click.echo(f"sae verify: {first} vs {'the workspace' if no_rerun else 'a rerun of that commit'}")
        click.echo(f"params and code: as {'the workspace' if ours else 'its'} dvc.lock records them\n"
                   if drift is not None else "params and code: not checked (no dvc.lock)\n")
        click.echo(format_report(result, show_all))
        if not result.ok:
            sys.exit(1)

    run_user_errors(body)
