"""What each stage writes as its results: the full detail, and a flat headline of numbers for DVC.

A stage measures far more than anyone compares across experiments: per-feature steering rows, scorer
means, the ``environment`` block, verdict sentences. All of it goes to ``results/<stage>.json`` (not a
DVC metric; the report, the MLflow run and ``sae verify`` read it). ``metrics/<stage>.json``, the DVC
metric, holds only the stage's headline: a flat ``{name: number}`` of the few values listed in
:data:`HEADLINE`, so ``dvc metrics diff`` stays short and ``dvc exp show`` has one column per headline
number (about ten for the default run) instead of hundreds.

A headline entry is a path into the stage's results whose segments match keys exactly or by their
base name (``fvu`` matches ``fvu@3``; the highest version present wins), so a definition's version bump
carries into the headline under its new name, visibly not comparable with the old column. ``HOOK``
stands for each hook of the stage (``extract.hooks`` order): the first hook's values are named plainly
(``fvu@3``), another hook's ``<hook>/<name>`` (``layers.3.mlp_out/fvu@3``). A name is the matched key
of the last versioned segment (``overall/sae_minus_random_hm@3/mean`` -> ``sae_minus_random_hm@3``),
else the last segment, unless the entry gives one. Headline base names are unique across stages:
DVC prefixes a name two files share with the file's path, which widens its column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json
from pipeline.paths import METRICS, RESULTS

__all__ = ["HEADLINE", "HOOK", "headline", "write_stage_results", "results_path", "metrics_path"]

HOOK = "<hook>"
# (path into results/<stage>.json, headline name or None for the matched key). The numbers a user
# compares across `dvc exp run -S ...`: reconstruction fidelity, sparsity, dead latents, how well the
# latents are explained, how well steering with them works, sparse probing. Few and
# short on purpose: `dvc exp show --only-changed` of an experiment against the default run must show
# every one of them at 200 columns (tests/test_headline.py), so prepare, extract and train, whose
# numbers evaluate measures better, have none; their results are in results/<stage>.json and MLflow.
HEADLINE: dict[str, tuple[tuple[tuple[str, ...], str | None], ...]] = {
    "prepare": (),
    "extract": (),
    "train": (),
    "evaluate": (((HOOK, "fvu"), None), ((HOOK, "l0"), None), ((HOOK, "ce_loss_recovered"), None),
                 ((HOOK, "dead_fraction"), None)),
    "interpret": (((HOOK, "mean_explanation_score"), None),),
    # steering: the likelihood evidence (steer.likelihood, the primary result: the SAE input latents' effect at the
    # verdict KL) and the generated text's hm; the comparisons with baselines are in results/steer.json
    "steer": ((("likelihood", "methods", "sae_input", "lik_effect", "mean"), None), (("overall", "sae_hm"), None)),
    "bench": (((HOOK, "sae_top_1_test_accuracy"), None),),
}


def results_path(stage: str, root: Path = Path(".")) -> Path:
    return root / RESULTS / f"{stage}.json"


def metrics_path(stage: str, root: Path = Path(".")) -> Path:
    return root / METRICS / f"{stage}.json"


def _match(node: Mapping[str, Any], segment: str) -> str | None:
    """The key of ``node`` that is ``segment`` or has it as base name (``name@N``, highest N); None if none."""
    if segment in node:
        return segment
    versions = [(int(v), k) for k in node if (b := k.partition("@"))[0] == segment and (v := b[2]).isdigit()]
    return max(versions)[1] if versions else None


def _lookup(results: Mapping[str, Any], path: Sequence[str]) -> tuple[str, float] | None:
    """``(name, value)`` at ``path`` (segments matched as in :func:`_match`), or None when absent or not a finite number."""
    node: Any = results
    keys: list[str] = []
    for segment in path:
        if not isinstance(node, Mapping) or (key := _match(node, segment)) is None:
            return None
        keys.append(key)
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return None
    versioned = [k for k in keys if "@" in k]
    return (versioned or keys)[-1], node


def headline(stage: str, results: Mapping[str, Any], hooks: Sequence[str] = ()) -> dict[str, float]:
    """The flat ``{name: number}`` headline of one stage's results (entries that are absent are left out)."""
    out: dict[str, float] = {}
    for path, alias in HEADLINE.get(stage, ()):
        for i, hook in enumerate(hooks if path[0] == HOOK else [None]):
            found = _lookup(results, (hook, *path[1:]) if hook is not None else path)
            if found is None:
                continue
            name = alias or found[0]
            out[name if i == 0 else f"{hook}/{name}"] = found[1]
    return out


def write_stage_results(stage: str, results: Mapping[str, Any], hooks: Sequence[str] = (),
                        root: Path = Path(".")) -> dict[str, float]:
    """Write ``results/<stage>.json`` (everything) and ``metrics/<stage>.json`` (its headline); return the headline.
    ``results`` must be JSON-ready (NaN already null: :func:`pipeline.io.nan_to_null`)."""
    atomic_write_json(results_path(stage, root), results)
    head = headline(stage, results, hooks)
    atomic_write_json(metrics_path(stage, root), head)
    return head
