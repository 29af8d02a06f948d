"""Runs that could not be logged: saved as bundles, uploaded later by ``sae sync``.

A bundle is ``.sae-cache/pending-runs/<record id>/`` (under the real repository root, git-ignored)
holding ``record.json`` (params, metrics, curves, tags, the tracking URI) and copies of the
artifacts under ``artifacts/`` — copies, because the workspace moves on (the next ``dvc repro``
rewrites the report) and the bundle must upload what this run produced. ``record.json`` is written
last and atomically, so a bundle without it is incomplete and ignored.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import atomic_write_json
from pipeline.tracking.record import RunRecord
from pipeline.tracking.store import TrackingUnavailable, log_record

log = logging.getLogger(__name__)

PENDING_DIR = Path(".sae-cache") / "pending-runs"
MAX_ARTIFACT_BYTES = 50 * 2**20  # reports and configs are small; never copy a stray large file


def pending_dir(root: Path) -> Path:
    return Path(root) / PENDING_DIR


def save_pending(record: RunRecord, uri: str, root: Path, reason: str) -> Path:
    """Write a bundle for ``record`` (artifacts copied, paths made bundle-relative); return its folder."""
    bundle = pending_dir(root) / record.record_id
    art_dir = bundle / "artifacts"
    art_dir.mkdir(parents=True, exist_ok=True)
    copied: list[list[str]] = []
    for i, (local, dest) in enumerate(record.artifacts):
        src = Path(local)
        if not src.is_file() or src.stat().st_size > MAX_ARTIFACT_BYTES:
            continue
        # The index prefix keeps same-named files (metrics/train.json vs sae/x/cfg.json) apart.
        rel = Path("artifacts") / f"{i:03d}" / src.name
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, bundle / rel)
        copied.append([str(rel), dest])
    data = record.to_json()
    data["artifacts"] = copied
    atomic_write_json(bundle / "record.json", {"tracking_uri": uri, "reason": reason, "record": data})
    return bundle


@dataclass
class Pending:
    path: Path
    record: RunRecord
    uri: str


def list_pending(root: Path) -> list[Pending]:
    """Complete bundles, oldest first."""
    out = []
    base = pending_dir(root)
    for rec in sorted(base.glob("*/record.json")) if base.is_dir() else []:
        try:
            data = json.loads(rec.read_text())
            out.append(Pending(rec.parent, RunRecord.from_json(data["record"]), str(data.get("tracking_uri", ""))))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("skipping pending run %s: unreadable record.json (%s)", rec.parent.name, e)
    return sorted(out, key=lambda p: p.record.created_ms)


def sync_pending(root: Path, uri: str | None = None) -> tuple[list[str], list[str]]:
    """Upload every pending bundle (to ``uri``, else the URI it was meant for); delete a bundle only
    after its run is logged. Returns ``(uploaded run ids, failure lines)``."""
    done: list[str] = []
    failed: list[str] = []
    for p in list_pending(root):
        target = uri or p.uri
        try:
            run_id = log_record(p.record, target, root, artifact_root=p.path)
        except TrackingUnavailable as e:
            failed.append(f"{p.record.run_name} ({p.path.name}): {e}")
            continue
        shutil.rmtree(p.path, ignore_errors=True)
        log.info("uploaded pending run %s as MLflow run %s to %s", p.record.run_name, run_id, target)
        done.append(run_id)
    return done, failed
