"""The MLflow side: which store, is it reachable, log one :class:`RunRecord`, read other runs.

Only the report stage and ``sae sync`` call :func:`log_record`, one process per run, and writes to
a SQLite store are serialised with a file lock next to the database, so queued experiments
(``dvc queue start -j 2``) never hit SQLite's "database is locked".
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.tracking.record import RunRecord

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# MLflow's REST client retries with exponential backoff for minutes by default; a tracker that is
# down must not stall the pipeline.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
            # We log the run id ourselves; MLflow's own "View run at" print would bypass log levels.
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class TrackingUnavailable(RuntimeError):
    """The store could not be reached or refused the run; the caller saves a pending bundle."""


def resolve_tracking_uri(param_uri: str | None, root: Path) -> str:
    """``tracking.uri`` param, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``.

    A relative SQLite path (``sqlite:///runs.db``) is resolved against ``root`` (the real repository
    root, see :func:`pipeline.tracking.workspace.repo_root`), never against a DVC temp copy.
    """
    uri = param_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{(Path(root) / DEFAULT_DB).resolve()}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return f"{prefix}{(Path(root) / uri[len(prefix):]).resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout_s: float) -> str | None:
    """None when the store looks usable, else a one-line reason. HTTP servers answer ``GET /health``."""
    if is_remote(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (user-configured URI)
                return None if resp.status == 200 else f"{url} answered HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            return f"{url} answered HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            return f"{uri} unreachable ({reason})"
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"{db.parent}: cannot create ({e.strerror})"
    return None


@contextlib.contextmanager
def _http_env() -> Iterator[None]:
    """Fail-fast HTTP settings unless the user chose their own."""
    added = [k for k in HTTP_ENV if k not in os.environ]
    os.environ.update({k: HTTP_ENV[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock on ``<db>.lock`` for SQLite stores (POSIX); a no-op for servers and elsewhere."""
    db = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent queued runs are a POSIX-only feature of DVC anyway
        fcntl = None  # type: ignore[assignment]
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str, uri: str, root: Path, create: bool = True) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    # A local store's default artifact root is "./mlruns" relative to the *current* directory,
    # which under `dvc exp run --queue` is a temp copy deleted afterwards: pin it to the real root.
    location = None if is_remote(uri) else (Path(root) / DEFAULT_ARTIFACTS).resolve().as_uri()
    created = client.create_experiment(name, artifact_location=location)
    if not is_remote(uri):
        _retire_default_experiment(client)
    return created


def _retire_default_experiment(client: Any) -> None:
    """Delete the empty ``Default`` experiment MLflow creates with a new local store: it points at
    ``./mlruns/0`` of whichever directory first opened the store (no such folder exists) and would be the
    first thing the MLflow UI shows. Kept when it holds runs (someone logged there on purpose)."""
    exp = client.get_experiment("0") if client.get_experiment_by_name("Default") is not None else None
    if exp is None or exp.name != "Default" or exp.lifecycle_stage != "active":
        return
    if client.search_runs(["0"], max_results=1, run_view_type=3):  # 3: active and deleted runs
        return
    client.delete_experiment("0")


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_record(record: RunRecord, uri: str, root: Path, artifact_root: Path | None = None) -> str:
    """Log ``record`` as one finished run and return its id; idempotent by ``record.record_id``.

    ``artifact_root``: where relative artifact paths of a pending bundle live. Raises
    :class:`TrackingUnavailable` on any store failure (after marking a half-written run FAILED).
    """
    from mlflow.entities import Metric, Param, RunTag

    with _http_env(), store_lock(uri):
        run_id = None
        try:
            client = _client(uri)
            exp_id = experiment_id(client, record.experiment, uri, root)
            # A sync that died half-way left a run behind: finished → done; otherwise replace it.
            for old in client.search_runs([exp_id], f"tags.`sae.record_id` = '{record.record_id}'"):
                if old.info.status == "FINISHED":
                    return old.info.run_id
                client.delete_run(old.info.run_id)
            run = client.create_run(exp_id, start_time=record.created_ms, run_name=record.run_name,
                                    tags={"sae.record_id": record.record_id})
            run_id = run.info.run_id
            ts = record.created_ms
            params = [Param(k, v) for k, v in record.params.items()]
            tags = [RunTag(k, v) for k, v in record.tags.items()]
            metrics = [Metric(k, float(v), ts, 0) for k, v in record.metrics.items()]
            metrics += [Metric(k, float(v), ts, int(s)) for k, pts in record.curves.items() for s, v in pts]
            for chunk in _chunks(params, 100):  # MLflow's log_batch limits: 100 params, 1000 entries
                client.log_batch(run_id, params=chunk)
            for chunk in _chunks(tags, 1000):
                client.log_batch(run_id, tags=chunk)
            for chunk in _chunks(metrics, 1000):
                client.log_batch(run_id, metrics=chunk)
            for local, dest in record.artifacts:
                path = Path(local)
                if not path.is_absolute() and artifact_root is not None:
                    path = artifact_root / path
                if path.is_file():
                    client.log_artifact(run_id, str(path), dest or None)
            client.set_terminated(run_id, "FINISHED", end_time=None)
            return run_id
        except Exception as e:  # any store failure → pending bundle; the pipeline result is safe on disk
            if run_id is not None:
                with contextlib.suppress(Exception):
                    client.set_terminated(run_id, "FAILED")
            raise TrackingUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


@dataclass
class RunPoint:
    """One experiment on the frontier plot."""

    run_name: str
    metrics: dict[str, float]
    current: bool = False


def search_points(uri: str, experiment: str, root: Path, names: tuple[str, ...],
                  exclude_record: str | None = None, max_runs: int = 1000) -> list[RunPoint]:
    """Finished runs of ``experiment`` that have any of the metrics ``names`` (e.g. ``l0``, ``fvu``)."""
    with _http_env(), store_lock(uri):  # a concurrent writer's commit must not fail this read
        client = _client(uri)
        exp_id = experiment_id(client, experiment, uri, root, create=False)
        if exp_id is None:
            return []
        runs = client.search_runs([exp_id], "attributes.status = 'FINISHED'", max_results=max_runs,
                                  order_by=["attributes.start_time ASC"])
    points = []
    for r in runs:
        if exclude_record and r.data.tags.get("sae.record_id") == exclude_record:
            continue
        m = {k: float(r.data.metrics[k]) for k in names if k in r.data.metrics}
        if m:
            points.append(RunPoint(r.info.run_name or r.info.run_id[:8], m))
    return points
