"""The steering verdict in the report: per-method test means and SAE-minus-baseline differences with their
95% bootstrap intervals, as written to ``overall`` of ``results/steer.json`` (``pipeline.steering.verdict``)."""

from __future__ import annotations

import math
import re
from typing import Any

from pipeline.params.analysis import SAE_METHODS
from pipeline.report.document import Para, Table

__all__ = ["verdict_blocks"]

_DIFF = re.compile(r"^(judge_)?sae_minus_(\w+)_hm@\d+$")


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "—"


def _ci(d: dict[str, Any]) -> str:
    lo, hi = d.get("ci95_low"), d.get("ci95_high")
    return f"[{_num(lo)}, {_num(hi)}]" if lo is not None and hi is not None else "— (fewer than 2 test prompts)"


def verdict_blocks(overall: dict[str, Any]) -> list[Para | Table]:
    """The verdict sentence, a table of test means and one of paired differences (empty for an old file)."""
    out: list[Para | Table] = []
    if isinstance(overall.get("summary"), str):
        out.append(Para(overall["summary"]))
    means = []
    for metric, pre in (("hm@2", ""), ("judge_hm", "judge_")):
        test = overall.get(f"test_{metric}")
        if not isinstance(test, dict):
            continue
        sae = overall.get(f"{pre}sae_method")
        for m, d in test.items():
            if isinstance(d, dict):
                role = "SAE (chosen on validation)" if m == sae else "SAE" if m in SAE_METHODS else "baseline"
                means.append([metric, str(m), role, _num(d.get("mean")), _ci(d)])
    if means:
        out.append(Table(["metric", "method", "role", "test mean", "95% CI"], means))
    diffs = []
    for key, d in overall.items():
        hit = _DIFF.match(key)
        if hit and isinstance(d, dict):
            sae = overall.get(f"{hit.group(1) or ''}sae_method", "SAE")
            diffs.append(["judge_hm" if hit.group(1) else "hm@2", f"{sae} − {hit.group(2)}", _num(d.get("mean")),
                          _ci(d), str(d.get("verdict", "")), str(d.get("wins", ""))])
    if diffs:
        out.append(Table(["metric", "paired difference", "test mean", "95% CI", "verdict", "better on features"], diffs))
    bs = overall.get("bootstrap")
    if isinstance(bs, dict):
        out.append(Para(f"Intervals: {bs.get('scheme')}; {bs.get('resamples')} resamples, seed {bs.get('seed')}, "
                        f"{bs.get('test_prompts')} test prompts x {bs.get('features')} features. A verdict says "
                        "beats / loses to only when the difference's interval excludes 0.", note=True))
    return out
