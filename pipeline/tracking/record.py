"""Everything one MLflow run holds, gathered from the files the stages wrote.

The report stage is the only process that writes a run (README, "Experiment tracking and reports"):
it reads every ``results/<stage>.json`` (a stage's full results; ``metrics/<stage>.json`` is only their
DVC headline, :mod:`pipeline.headline`) — including those of stages DVC skipped, since their files are
still there — the training curves ``plots/train/<hook>.csv``, the activation manifests and the SAE
configs, and builds a :class:`RunRecord`. The record is plain JSON so a run that could not be logged is
saved as a pending bundle and uploaded later, unchanged (:mod:`pipeline.tracking.pending`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.environment import KEY as ENVIRONMENT_KEY
from pipeline.paths import ACTIVATIONS, METRICS, MODELS, PLOTS, RESULTS, TRAIN_CURVES
from pipeline.tracking.names import MAX_TAG_VALUE, iter_numeric, metric_base, metric_key, param_value
from pipeline.tracking.workspace import git_info, package_versions

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("loss", "l0", "fvu", "dead_fraction")
# Headline metrics, one value per run, looked up in this stage order: the frontier across
# experiments plots them (L0–FVU and L0–CE-loss-recovered, one point per experiment).
HEADLINE = ("l0", "fvu", "ce_loss_recovered")
HEADLINE_STAGES = ("evaluate", "train")


@dataclass
class RunRecord:
    """One pipeline execution, ready to log. ``curves`` maps a metric key to ``[[step, value], ...]``;
    ``artifacts`` lists ``[local path, artifact dir]`` pairs."""

    record_id: str
    experiment: str
    run_name: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[list[str]] = field(default_factory=list)
    created_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_stage_metrics(metrics_dir: Path) -> dict[str, dict[tuple[str, ...], float]]:
    """``results/<stage>.json`` → ``{stage: {(path, ..., name): value}}``; unreadable files are skipped with a warning."""
    out: dict[str, dict[tuple[str, ...], float]] = {}
    if not metrics_dir.is_dir():
        return out
    for path in sorted(metrics_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("skipping %s: not readable JSON (%s)", path, e)
            continue
        if not isinstance(data, dict):
            log.warning("skipping %s: expected a JSON object of metrics", path)
            continue
        out[path.stem] = dict(iter_numeric(data))
    return out


def environment_tags(metrics_dir: Path) -> dict[str, str]:
    """Tags from the ``environment`` block of each ``results/<stage>.json`` (:mod:`pipeline.environment`):
    ``env.<key>`` for a value every stage that records the key agrees on (the CPU, the versions), else
    ``env.<stage>.<key>`` per stage (e.g. threads that differ between stages)."""
    blocks: dict[str, dict[str, str]] = {}
    for path in sorted(metrics_dir.glob("*.json")) if metrics_dir.is_dir() else []:
        try:
            block = json.loads(path.read_text()).get(ENVIRONMENT_KEY)
        except (OSError, ValueError, AttributeError):
            continue  # read_stage_metrics warns about unreadable files
        if isinstance(block, dict):
            blocks[path.stem] = {str(k): str(v) for k, v in block.items()}
    tags: dict[str, str] = {}
    for key in sorted({k for block in blocks.values() for k in block}):
        values = {stage: block[key] for stage, block in blocks.items() if key in block}
        if len(set(values.values())) == 1:
            tags[f"env.{key}"] = next(iter(values.values()))
        else:
            tags.update({f"env.{stage}.{key}": value for stage, value in values.items()})
    return tags


def read_curve(path: Path) -> dict[str, list[list[float]]]:
    """``plots/train/<hook>.csv`` (columns step, loss, l0, fvu, dead_fraction) → ``{column: [[step, value]]}``."""
    curves: dict[str, list[list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row["step"]))
            except (KeyError, TypeError, ValueError):
                continue
            for col, raw in row.items():
                if col == "step" or raw in (None, ""):
                    continue
                try:
                    curves.setdefault(col, []).append([step, float(raw)])
                except ValueError:
                    continue
    return curves


def headline_metrics(stage_metrics: Mapping[str, Mapping[tuple[str, ...], float]],
                     hook: str | None) -> dict[str, tuple[float, str]]:
    """``{"l0": (value, source), ...}``: from the evaluate stage if it has it, else train; the
    highest definition version wins; keys under the first hook are preferred when there are several."""
    found: dict[str, tuple[float, str]] = {}
    for name in HEADLINE:
        for stage in HEADLINE_STAGES:
            cands = []
            for path, value in stage_metrics.get(stage, {}).items():
                base, version = metric_base(path[-1])
                if base.lower() != name:
                    continue
                on_hook = hook is not None and hook in path[:-1]
                cands.append((on_hook, version or 0, len(path) == 1, path, value))
            if cands:
                *_, path, value = max(cands, key=lambda c: c[:3])
                found[name] = (value, "/".join((stage, *path)))
                break
    return found


def read_manifest(root: Path, hook: str) -> dict[str, Any]:
    for split in ("train", "validation"):
        p = root / ACTIVATIONS / split / hook / "manifest.json"
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except (OSError, ValueError):
                log.warning("skipping %s: not readable JSON", p)
    return {}


def source_tags(models: Path) -> dict[str, str]:
    """``source.<hook>.*`` tags from each imported SAE's ``provenance.json`` (``sae.source``): the reference, the
    files' layout and sha256, the hook and model the files name; none for a trained SAE."""
    tags: dict[str, str] = {}
    for p in sorted(models.glob("*/provenance.json")) if models.is_dir() else []:
        try:
            prov = json.loads(p.read_text())
        except (OSError, ValueError):
            log.warning("skipping %s: not readable JSON", p)
            continue
        pre = f"source.{p.parent.name}"
        tags.update({f"{pre}.{k}": str(prov.get(k)) for k in ("source", "format", "digest", "source_hook", "source_model")})
        tags.update({f"{pre}.ref.{k}": str(v) for k, v in (prov.get("reference") or {}).items()})
        tags.update({f"{pre}.sha256.{name.replace('../', 'parent/')}": str(sha)
                     for name, sha in (prov.get("files_sha256") or {}).items()})
    return tags


def _artifacts(root: Path) -> list[list[str]]:
    arts: list[list[str]] = []
    for p in sorted((root / MODELS).glob("*/cfg.json")) + sorted((root / MODELS).glob("*/provenance.json")):
        arts.append([str(p), f"sae/{p.parent.name}"])
    for folder in (RESULTS, METRICS):  # everything each stage measured; its DVC headline
        for p in sorted((root / folder).glob("*.json")):
            arts.append([str(p), folder.name])
    plots = root / PLOTS
    for p in sorted(plots.rglob("*.csv")) if plots.is_dir() else []:
        arts.append([str(p), str(PLOTS / p.parent.relative_to(plots))])
    for name in ("params.yaml", "dvc.lock"):
        if (root / name).is_file():
            arts.append([str(root / name), ""])
    return arts


def build_record(root: Path, flat_params: Mapping[str, Any], experiment: str, hooks: list[str]) -> RunRecord:
    """Gather one run from workspace ``root`` (the stage's working directory).

    ``flat_params`` are the dotted params (``pipeline.params.flatten(to_dict(params))``); ``hooks``
    are ``extract.hooks`` (the first one supplies the headline metrics and the model tags). The
    caller appends the report's own files to ``artifacts`` once they are written.
    """
    root = Path(root)
    exp_name = os.environ.get("DVC_EXP_NAME") or ""
    git = git_info(root)
    commit = git.get("commit", "")
    run_name = exp_name or (f"workspace-{commit[:7]}" if commit else "workspace")

    stage_metrics = read_stage_metrics(root / RESULTS)
    metrics: dict[str, float] = {}
    for stage, values in stage_metrics.items():
        for path, value in values.items():
            key = metric_key(stage, *path)
            if key in metrics:
                log.warning("metric %s/%s collides with another name after sanitising; kept the first",
                            stage, "/".join(path))
                continue
            metrics[key] = value
    hook = hooks[0] if hooks else None
    tags: dict[str, str] = {}
    for name, (value, source) in headline_metrics(stage_metrics, hook).items():
        metrics[name] = value
        tags[f"headline.{name}"] = source

    curves: dict[str, list[list[float]]] = {}
    for csv_path in sorted((root / TRAIN_CURVES).glob("*.csv")):
        for col, points in read_curve(csv_path).items():
            curves[metric_key("curve", csv_path.stem, col)] = points

    manifest = read_manifest(root, hook) if hook else {}
    tags.update({
        "git.commit": commit,
        "git.dirty": git.get("dirty", "unknown"),
        "dvc.exp_name": exp_name,
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or commit,
        "model.id": str(manifest.get("model_id", flat_params.get("model.name", ""))),
        "model.revision": str(manifest.get("revision", flat_params.get("model.revision", ""))),
        "model.weights_hash": str(manifest.get("weights_hash", "")),
        "hook": ",".join(hooks),
        "metric_files": ",".join(sorted(stage_metrics)),
    })
    if commit:
        tags["mlflow.source.git.commit"] = commit  # shown in the MLflow UI's run header
    if git.get("dirty_files"):
        tags["git.dirty_files"] = git["dirty_files"]
    tags.update({f"versions.{k}": v for k, v in package_versions().items()})
    tags.update(environment_tags(root / RESULTS))  # what the numbers were computed with, per stage
    tags.update(source_tags(root / MODELS))  # an imported SAE's provenance
    record_id = uuid.uuid4().hex
    tags["sae.record_id"] = record_id
    return RunRecord(
        record_id=record_id,
        experiment=experiment,
        run_name=run_name,
        params={k: param_value(v) for k, v in sorted(flat_params.items())},
        metrics=metrics,
        curves=curves,
        tags={k: v[:MAX_TAG_VALUE] for k, v in tags.items()},
        artifacts=_artifacts(root),
        created_ms=int(time.time() * 1000),
    )
