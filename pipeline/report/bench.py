"""The report's SAEBench-comparable section: sparse probing accuracies against the raw-activation
baseline, with their 95% intervals, and feature absorption (or why it was not evaluated)."""

from __future__ import annotations

import math
from typing import Any

from pipeline.metric_names import (
    ABSORPTION_LETTERS,
    MEAN_ABSORPTION_FRACTION,
    MEAN_FULL_ABSORPTION,
    MEAN_SPLIT_FEATURES,
    versioned,
)
from pipeline.report.document import Document, Heading, Para, Table

KS = (1, 2, 5, 10, 20, 50, 100)


def _cell(values: dict[str, float], name: str) -> str:
    v = values.get(versioned(name))
    if v is None or not math.isfinite(v):
        return "—"
    lo, hi = values.get(f"{versioned(name)}_ci_low"), values.get(f"{versioned(name)}_ci_high")
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f}"


def bench_blocks(hook: str, values: dict[str, float]) -> list[Any]:
    """Blocks for one hook; ``values``: the hook's top-level numbers of ``results/bench.json``."""
    rows = []
    for k in KS:
        if any(versioned(f"{s}_top_{k}_test_accuracy") in values for s in ("sae", "llm")):
            rows.append([f"top {k}", *(_cell(values, f"{s}_top_{k}_test_accuracy") for s in ("sae", "sae_l1", "llm", "llm_l1"))])
    rows.append(["all (C on validation)", _cell(values, "sae_test_accuracy"), "", _cell(values, "llm_test_accuracy"), ""])
    blocks: list[Any] = [Heading(2, hook), Table(
        ["probe inputs", "SAE latents (mean-diff)", "SAE latents (L1)", "activations (mean-diff)", "activations (L1)"], rows)]
    n = values.get(ABSORPTION_LETTERS)
    if values.get(MEAN_ABSORPTION_FRACTION) is not None:
        blocks.append(Para(
            f"Feature absorption (first letter, {int(n or 0)} letters present): mean absorption fraction "
            f"{values[MEAN_ABSORPTION_FRACTION]:.3f}, full-absorption rate {values[MEAN_FULL_ABSORPTION]:.3f}, "
            f"main latents per letter {values[MEAN_SPLIT_FEATURES]:.2f} (lower absorption is better)."))
    elif n is not None:
        blocks.append(Para(f"Feature absorption not evaluated: only {int(n)} of 26 first letters have a ground-truth "
                           "probe with test F1 > 0.6 at this hook (bench.absorption_min_letters); no number is "
                           "reported rather than one built on too few letters.", note=True))
    return blocks


def bench_section(doc: Document, stage_metrics: dict[str, dict[tuple[str, ...], float]], hooks: list[str]) -> None:
    """Add the section when the bench stage ran (``stage_metrics["bench"]``: flattened results/bench.json)."""
    flat = stage_metrics.get("bench")
    if not flat:
        return
    doc.add(Heading(1, "SAEBench-comparable evaluation"),
            Para("k-sparse probing on the corpus's topic labels (SAEBench's recipe: one-vs-rest per label, documents "
                 "mean-pooled over non-special tokens, the k inputs with the largest train-split mean difference, or "
                 "the first k an L1-penalised probe admits), test accuracy averaged over labels with a 95% bootstrap "
                 "interval over test documents. The activation columns are the baseline the SAE is measured "
                 "against. SAEBench result files: eval_results/<eval>/sae-pipeline_<hook>_eval_results.json.",
                 note=True))
    for hook in hooks:
        values = {path[1]: v for path, v in flat.items() if len(path) == 2 and path[0] == hook}
        if values:
            doc.add(*bench_blocks(hook, values))


__all__ = ["bench_section", "bench_blocks"]
