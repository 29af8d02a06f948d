"""Experiment tracking: one MLflow run per pipeline execution, written by the report stage only.

* :mod:`~pipeline.tracking.record` gathers a :class:`RunRecord` from the files the stages wrote;
* :mod:`~pipeline.tracking.store` resolves the store (``DVC_ROOT``-aware), probes it, logs a record;
* :mod:`~pipeline.tracking.pending` keeps runs the store could not take, for ``sae sync``;
* :mod:`~pipeline.tracking.names` maps ``fvu@2`` to MLflow-safe ``fvu_v2``.
"""

from __future__ import annotations

from pipeline.tracking.names import metric_base, metric_key, sanitize_component
from pipeline.tracking.pending import list_pending, save_pending, sync_pending
from pipeline.tracking.record import RunRecord, build_record, headline_metrics
from pipeline.tracking.store import (
    RunPoint,
    TrackingUnavailable,
    log_record,
    probe,
    resolve_tracking_uri,
    search_points,
)
from pipeline.tracking.workspace import repo_root

__all__ = [
    "RunRecord", "RunPoint", "TrackingUnavailable", "build_record", "headline_metrics", "list_pending",
    "log_record", "metric_base", "metric_key", "probe", "repo_root", "resolve_tracking_uri",
    "sanitize_component", "save_pending", "search_points", "sync_pending",
]
