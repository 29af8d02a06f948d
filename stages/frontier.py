"""``sae frontier``: the L0-FVU and L0-CE-recovered frontier across DVC experiments, as a PNG.

Not a DVC stage (it reads every experiment, not one workspace): run it after a sweep, e.g.
``dvc exp run -S sae.k=16,32,64 --queue && dvc queue start`` then ``sae frontier``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click

from pipeline.errors import UserError
from stages.common import run_user_errors

log = logging.getLogger("sae.frontier")


def exp_show_json(path: str | None) -> list:
    """``dvc exp show --json`` output, from ``path`` or by running DVC in the current repository."""
    if path:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not readable `dvc exp show --json` output ({type(e).__name__})") from None
    # The dvc installed beside this interpreter first: `.venv/bin/sae frontier` works without an activated venv.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        res = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=False, env=env)
    except FileNotFoundError:
        raise UserError("dvc: command not found (install dvc, or pass --exp-json FILE)") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"dvc exp show --json failed: {last}")
    return json.loads(res.stdout)


@click.command(help="Plot the L0-FVU and L0-CE-loss-recovered frontier across DVC experiments (PNG).")
@click.option("--out", default="reports/frontier.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG to write.")
@click.option("--exp-json", default=None, type=click.Path(dir_okay=False),
              help="Saved `dvc exp show --json` output (default: run it here).")
@click.option("--include-workspace", is_flag=True, help="Also plot the uncommitted workspace.")
def command(out: str, exp_json: str | None, include_workspace: bool) -> None:
    def run() -> None:
        from pipeline.frontier import frontier_points, plot_frontier

        points = frontier_points(exp_show_json(exp_json), include_workspace=include_workspace)
        if not points:
            raise UserError("no experiment has an L0 in metrics/evaluate.json (run `dvc repro` or `dvc exp run` first)")
        plot_frontier(points, out)
        log.info("wrote %s: %d points from %d runs", out, len(points), len({p.name for p in points}))

    run_user_errors(run)
