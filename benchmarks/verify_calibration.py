"""Calibration of ``sae verify``'s tolerances: two runs of a pipeline that differ in the resolved dtype.

    git clone . /tmp/cal && cd /tmp/cal && dvc repro steer evaluate        # auto: bf16 on a CPU with AMX
    cp -a /tmp/cal /tmp/cal-fp32 && cd /tmp/cal-fp32                       # what auto picks on a CPU without bf16:
    # params.yaml: train.dtype: float32, interpret.encode_dtype: float32; then
    dvc repro steer evaluate
    python benchmarks/verify_calibration.py /tmp/cal/metrics /tmp/cal-fp32/metrics --out results/x.json

Writes both runs' ``metrics/*.json`` (environment blocks included) and, per metric that moved, the two
values, the rule of ``pipeline.verify.TOLERANCES`` it meets and ``room``: the tolerance over the observed
difference (``tests/test_verify_causes.py`` demands >= 2 for every rule with a numeric tolerance), and for
a steering mean its move in half-widths of the recorded 95% interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io import atomic_write_json  # noqa: E402
from pipeline.verify import compare  # noqa: E402


def read(directory: Path) -> dict[str, Any]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def differences(bf16: dict[str, Any], fp32: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric that moved between the runs (bf16 taken as the record)."""
    rows = []
    for r in compare(bf16, fp32).rows:
        if r.status == "identical":
            continue
        row: dict[str, Any] = {"metric": r.metric, "bfloat16": r.recorded, "float32": r.now, "status": r.status,
                               "rule": r.rule.pattern, "tolerance": r.rule.describe()}
        if r.rule.kind == "close" and all(isinstance(v, int | float) for v in (r.recorded, r.now)):
            diff = abs(r.now - r.recorded)
            row.update(abs_diff=diff, rel_diff=diff / abs(r.recorded) if r.recorded else None,
                       room=(r.rule.abs + r.rule.rel * abs(r.recorded)) / diff if diff else None)
        if isinstance(r.recorded, dict) and isinstance(r.now, dict):  # a bootstrap mean: the move in half-widths
            half = (r.recorded["ci95_high"] - r.recorded["ci95_low"]) / 2
            row["half_widths"] = abs(r.now["mean"] - r.recorded["mean"]) / half if half else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bf16", type=Path, help="metrics/ of the run with bf16 (auto on a CPU with AMX)")
    ap.add_argument("fp32", type=Path, help="metrics/ of the run with train.dtype and interpret.encode_dtype float32")
    ap.add_argument("--note", default="", help="where and how the runs were made")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    bf16, fp32 = read(args.bf16), read(args.fp32)
    rows = differences(bf16, fp32)
    rooms = [r["room"] for r in rows if r.get("room")]
    atomic_write_json(args.out, {"note": args.note, "min_room": min(rooms) if rooms else None,
                                 "differences": rows, "bfloat16": bf16, "float32": fp32})
    for r in rows:
        print(f"{r['metric']:70s} {r['bfloat16']!s:>24.24} {r['float32']!s:>24.24} {r['tolerance']:>22s} "
              f"room {r.get('room') or '-'}")


if __name__ == "__main__":
    main()
