"""How much data a CPU run needs: the default SAE trained on growing token counts, quality against tokens.

    python benchmarks/scaling.py                                   # 0.25M / 1M / 4M training tokens, default data
    python benchmarks/scaling.py --tokens 262144,1048576 --workspace /tmp/scaling --set corpus.n_tokens=524288

A scratch clone of this repository (``--workspace``; the committed ``HEAD``, so commit first) runs ``sae prepare`` and
``sae extract`` once with the committed ``params.yaml`` (plus ``--set`` overrides), then for each token count
``sae train --set train.n_tokens=N``, ``sae evaluate`` and ``sae interpret`` from scratch (checkpoints removed), exactly
the stages ``dvc repro`` runs. A count beyond the train split's size is several epochs over it. Everything else (SAE
size, LR schedule, dead window, evaluation and interpretation settings) stays the default's, so the curve answers
"what does more data buy the default run".

Per count the JSON (``--out``) holds the headline quality numbers, each under its versioned metric name, picked by
name prefix at the highest version the stage wrote: the FVU and CE loss recovered on validation tokens (``evaluate``),
the dead fraction (``evaluate``), the median best-topic AUROC over alive latents and the fraction of alive latents
with topic AUROC >= 0.9 (``interpret``); plus the stage wall times and every metric of the three files. ``--plot``
writes the four curves against tokens (log axis) as a PNG. Not part of CI: a full run takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENS = (262_144, 1_048_576, 4_194_304)
# (label, metrics file, metric name prefix): the quality numbers the scaling curve is about.
HEADLINE = (
    ("fvu", "evaluate", "fvu@"),
    ("ce_loss_recovered", "evaluate", "ce_loss_recovered@"),
    ("dead_fraction", "evaluate", "dead_fraction@"),
    ("median_topic_auroc", "interpret", "median_topic_auroc@"),
    ("frac_topic_auroc_ge_0.9", "interpret", "frac_topic_auroc_ge_0.9@"),
)


def latest(metrics: dict[str, Any], prefix: str) -> tuple[str, Any] | None:
    """The ``(name, value)`` of the highest definition version of ``prefix`` in one hook's metrics (None if absent)."""
    found = [(int(k[len(prefix):]), k) for k in metrics if k.startswith(prefix) and k[len(prefix):].isdigit()]
    if not found:
        return None
    _, name = max(found)
    return name, metrics[name]


def headline(per_stage: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``label -> {"metric": versioned name, "value": v}`` from one hook's ``{stage: metrics}``."""
    out: dict[str, dict[str, Any]] = {}
    for label, stage, prefix in HEADLINE:
        hit = latest(per_stage.get(stage, {}), prefix)
        if hit is not None:
            out[label] = {"metric": hit[0], "value": hit[1]}
    return out


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1")
    return e


def sae(ws: Path, stage: str, overrides: list[str]) -> float:
    """Run ``sae <stage> --set ...`` in the workspace; its wall time in seconds."""
    cmd = [sys.executable, "-m", "stages", stage, *(a for o in overrides for a in ("--set", o))]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ws, env=_env(), capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


def read_hook_metrics(ws: Path, stage: str) -> dict[str, dict[str, Any]]:
    path = ws / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = (("fvu", "FVU (lower is better)"), ("ce_loss_recovered", "CE loss recovered"),
              ("dead_fraction", "dead fraction"), ("frac_topic_auroc_ge_0.9", "alive latents with topic AUROC ≥ 0.9"))
    for ax, (label, title) in zip(axes, panels, strict=True):
        pts = [(r["train_tokens"], r["headline"][label]["value"]) for r in rows
               if label in r["headline"] and r["headline"][label]["value"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o")
        ax.set_xscale("log")
        ticks = sorted({r["train_tokens"] for r in rows})
        ax.set_xticks(ticks, [f"{t / 1e6:.3g}M" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="training token counts, comma-separated")
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/sae-scaling"), help="scratch clone (created if absent)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override for every stage")
    ap.add_argument("--out", type=Path, default=None, help="results JSON")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the curves")
    args = ap.parse_args(argv)
    counts = [int(t) for t in args.tokens.split(",") if t]

    ws: Path = args.workspace
    if not (ws / "params.yaml").exists():
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(ws)], check=True)
    setup = {stage: sae(ws, stage, args.overrides) for stage in ("prepare", "extract")}
    rows: list[dict[str, Any]] = []
    for n in counts:
        for stale in ("checkpoints", "models"):
            shutil.rmtree(ws / stale, ignore_errors=True)
        over = [*args.overrides, f"train.n_tokens={n}"]
        times = {stage: sae(ws, stage, over) for stage in ("train", "evaluate", "interpret")}
        stages = {s: read_hook_metrics(ws, s) for s in ("train", "evaluate", "interpret")}
        for hook in (h for h, m in stages["evaluate"].items() if h != "environment" and isinstance(m, dict)):
            per_stage = {s: m.get(hook, {}) for s, m in stages.items()}
            rows.append({"train_tokens": n, "hook": hook, "seconds": times, "headline": headline(per_stage),
                         "metrics": per_stage})
            print(f"{n:>10,} tokens {hook}: " + ", ".join(
                f"{k} {v['value']:.4g}" for k, v in rows[-1]["headline"].items() if isinstance(v["value"], float)),
                f"| train {times['train']:.0f} s", flush=True)
    report = {"benchmark": "scaling", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average": os.getloadavg(), "overrides": args.overrides, "setup_seconds": setup, "rows": rows}
    try:
        report["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                             if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=float))
        os.replace(tmp, args.out)
    if args.plot:
        plot(rows, args.plot)
    return report


if __name__ == "__main__":
    main()
