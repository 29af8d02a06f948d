"""Wall-clock of the ``steer`` stage on a finished workspace, at given params (the stage's 150 s budget).

    python benchmarks/steer.py --workspace /path/to/finished/default/run            # the default params
    python benchmarks/steer.py --workspace WS --set steer.likelihood=false            # generation path only
    python benchmarks/steer.py --workspace WS --repeats 2 --out steer-bench.json      # also checks the bits repeat

The workspace is a directory where ``dvc repro`` (or prepare … interpret) has run: it needs
``params.yaml``, ``data/tokens``, ``data/activations/<steer.stats_split>``, ``models/sae`` and
optionally ``data/interpret``. Each repeat runs ``sae steer`` in a fresh process in a scratch copy
of the workspace's inputs (the workspace itself is never written), so model loading is counted as
the stage pays it. Reported: each run's wall seconds, the stage's own breakdown
(``reports/steer/runtime.json``: generation, ablation, likelihood), the CPU, the thread count and
whether the results (``results/steer.json`` and the ``data/steer`` tables, environment block aside) were
identical across repeats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

INPUTS = ("params.yaml", "data/tokens", "data/activations", "models/sae", "data/interpret")


def _digest(run: Path) -> str:
    """sha256 over what the stage measured (``results/steer.json``, the ``metrics/`` headline, the per-unit
    tables), the environment block (versions, not results) left out."""
    h = hashlib.sha256()
    for rel in ("results/steer.json", "metrics/steer.json"):
        if (run / rel).is_file():
            d = json.loads((run / rel).read_text())
            d.pop("environment", None)
            h.update(json.dumps(d, sort_keys=True).encode())
    for rel in ("data/steer/generations.parquet", "data/steer/likelihood.parquet", "data/steer/ablation.parquet"):
        if (run / rel).is_file():
            h.update((run / rel).read_bytes())
    return h.hexdigest()


def run_once(workspace: Path, sets: list[str], scratch: Path) -> dict[str, Any]:
    """One ``sae steer`` in a scratch copy of the workspace's inputs (symlinked: read-only use)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for rel in INPUTS:
        src = workspace / rel
        if src.exists():
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                os.symlink(src.resolve(), scratch / rel)
            else:
                shutil.copy2(src, scratch / rel)
    sae = Path(sys.executable).with_name("sae")
    cmd = [str(sae) if sae.exists() else "sae", "steer", *(a for s in sets for a in ("--set", s))]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=scratch, check=True)
    wall = time.perf_counter() - t0
    rt = scratch / "reports/steer/runtime.json"
    return {"wall_s": round(wall, 2), "runtime": json.loads(rt.read_text()) if rt.is_file() else {},
            "results_sha256": _digest(scratch)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="a finished run's directory (inputs of sae steer)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="param override, as `sae steer --set`")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="steer-bench-") as tmp:
        for i in range(args.repeats):
            runs.append(run_once(args.workspace.resolve(), args.sets, Path(tmp) / f"run{i}"))
    report = {"sets": args.sets, "runs": runs, "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
              "bits_repeat": len({r["results_sha256"] for r in runs}) == 1 if len(runs) > 1 else None}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
