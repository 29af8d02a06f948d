"""MLflow tracking: one run per execution with everything in it, DVC_ROOT-aware store, pending runs and ``sae sync``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name
from tracking_fixtures import CURVE, HOOK, fabricate_workspace, minimal_params

from pipeline.tracking import (
    RunRecord,
    headline_metrics,
    list_pending,
    log_record,
    metric_base,
    metric_key,
    resolve_tracking_uri,
    sanitize_component,
)
from stages.report import command as report_command
from stages.tracking_sync import command as sync_command


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds); tests use their own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, store: str) -> None:
    for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)


def run_stage(ws: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> None:
    monkeypatch.chdir(ws)
    args = ["--params", str(ws / "params.yaml")] + [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(report_command, args)
    assert result.exit_code == 0, (result.output, result.exception)


def runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_metric_names_are_mlflow_safe() -> None:
    assert sanitize_component("fvu@2") == "fvu_v2"
    assert metric_key("evaluate", HOOK, "fvu@2") == f"evaluate/{HOOK}/fvu_v2"
    for raw in ("fvu@2", "a:b", "..", "x/y", "ce loss@10", "é"):
        key = metric_key("stage", raw)
        assert validate_param_and_metric_name(key) and not path_not_unique(key), key
    assert metric_key("s", "a:b") == "s/a_b" and metric_key("s", "x/y") == "s/x_y"
    assert metric_base("fvu@2") == ("fvu", 2) == metric_base("fvu_v2")
    assert metric_base("loss") == ("loss", None)


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///runs/x.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"


def test_headline_prefers_evaluate_highest_version() -> None:
    stage = {"train": {(HOOK, "fvu@2"): 0.3, (HOOK, "l0@1"): 31.5},
             "evaluate": {(HOOK, "fvu@1"): 0.99, (HOOK, "fvu@2"): 0.25, ("other.hook", "fvu@3"): 0.5}}
    found = headline_metrics(stage, HOOK)
    assert found["fvu"] == (0.25, f"evaluate/{HOOK}/fvu@2")  # on-hook beats a higher version elsewhere
    assert found["l0"] == (31.5, f"train/{HOOK}/l0@1")  # evaluate has no l0: fall back to train
    assert "ce_loss_recovered" not in found


def test_one_run_with_params_metrics_curves_tags_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           store: str) -> None:
    ws = fabricate_workspace(tmp_path / "ws", git=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    run_stage(ws, monkeypatch, "tracking.experiment=one-run")
    (run,) = runs(store, "one-run")
    d = run.data
    assert run.info.run_name == f"workspace-{commit[:7]}" and run.info.status == "FINISHED"
    assert d.params["train.lr"] == "0.0005" and d.params["extract.hooks"] == f'["{HOOK}"]'
    assert d.params["model.name"] == "smollm2-135m" and d.params["tracking.experiment"] == "one-run"
    assert d.metrics[f"evaluate/{HOOK}/fvu_v2"] == 0.25 and d.metrics[f"train/{HOOK}/fvu_v2"] == 0.3
    assert d.metrics["prepare/n_tokens_v1"] == 12800 and d.metrics["steer/overall/sae_concept_v1"] == 0.7
    assert (d.metrics["fvu"], d.metrics["l0"], d.metrics["ce_loss_recovered"]) == (0.25, 32.0, 0.9)
    history = MlflowClient(store).get_metric_history(run.info.run_id, f"curve/{HOOK}/loss")
    assert sorted((m.step, m.value) for m in history) == [(r[0], r[1]) for r in CURVE]
    t = d.tags
    assert t["git.commit"] == commit and t["git.dirty"] == "false" and t["dvc.exp_name"] == ""
    assert t["model.id"] == "tiny/llama" and t["model.weights_hash"] == "abc123def456" and t["hook"] == HOOK
    assert t["versions.mlflow"] and t["versions.torch"] and t["headline.fvu"] == f"evaluate/{HOOK}/fvu@2"
    client = MlflowClient(store)
    listed = {a.path for top in ("report", "metrics", "results", f"sae/{HOOK}")
              for a in client.list_artifacts(run.info.run_id, top)}
    assert {"report/summary.html", "report/summary.md", "metrics/evaluate.json", "results/evaluate.json",
            f"sae/{HOOK}/cfg.json"} <= listed

    # A second execution is a second run, and the first one is on its frontier; a modified tracked file marks it dirty.
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text().replace("\nseed: 0\n", "\nseed: 1\n"))
    run_stage(ws, monkeypatch, "tracking.experiment=one-run")
    second = [r for r in runs(store, "one-run") if r.info.run_id != run.info.run_id]
    assert len(second) == 1 and second[0].data.tags["git.dirty"] == "true"
    assert second[0].data.params["seed"] == "1"
    assert f"| workspace-{commit[:7]} | 32 | 0.25 | 0.9 |" in (ws / "reports" / "summary.md").read_text()


def test_queue_copy_logs_to_dvc_root_under_exp_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --queue` runs in a temp copy; DVC_ROOT is the real root, DVC_EXP_NAME names the run."""
    root, copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    root.mkdir()
    fabricate_workspace(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_EXP_NAME", "frisky-lamb")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    run_stage(copy, monkeypatch)
    assert (root / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
    assert not (copy / "mlruns").exists() and not (copy / "mlartifacts").exists()
    (run,) = runs(f"sqlite:///{root / 'mlflow.db'}", "sae-pipeline")
    assert run.info.run_name == "frisky-lamb" and run.data.tags["dvc.exp_name"] == "frisky-lamb"
    assert run.data.tags["dvc.baseline_rev"] == "0123456789abcdef"
    assert run.info.artifact_uri.startswith((root / "mlartifacts").resolve().as_uri())
    assert any((root / "mlartifacts").rglob("summary.html"))


def test_unusable_store_saves_pending_and_sync_uploads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           store: str) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the store's parent is a file: the probe fails without touching MLflow
    run_stage(ws, monkeypatch, f"tracking.uri=sqlite:///{blocker}/x.db", "tracking.experiment=pending")
    (p,) = list_pending(ws)
    assert (ws / "reports" / "summary.html").is_file() and p.record.metrics["fvu"] == 0.25
    # An interrupted earlier sync left a RUNNING run with the same record id: sync replaces it, no duplicate.
    client = MlflowClient(store)
    exp_id = client.create_experiment("pending")
    client.create_run(exp_id, tags={"sae.record_id": p.record.record_id})
    listed = CliRunner().invoke(sync_command, ["--list"])
    assert listed.exit_code == 0 and p.record.record_id in listed.output and "1 pending run(s)" in listed.output
    result = CliRunner().invoke(sync_command, ["--uri", store])
    assert result.exit_code == 0, result.output
    assert list_pending(ws) == []
    (run,) = runs(store, "pending")
    assert run.info.status == "FINISHED" and run.data.metrics[f"evaluate/{HOOK}/fvu_v2"] == 0.25
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/summary.html"}


def test_log_record_is_idempotent(tmp_path: Path, store: str) -> None:
    rec = RunRecord(record_id="r" * 32, experiment="idem", run_name="x", params={"a": "1"}, metrics={"m": 1.0},
                    curves={"c": [[0, 1.0], [5, 2.0]]}, created_ms=1_700_000_000_000)
    first = log_record(rec, store, tmp_path)
    assert log_record(rec, store, tmp_path) == first and len(runs(store, "idem")) == 1


# --- a real MLflow server on loopback, stopped mid-pipeline -------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int, tmp: Path) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "art")],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "ab"), start_new_session=True,
        # No background job workers (huey): they only slow the start on a small box.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.monotonic() + 90  # a loaded 2-core box needs ~10-40 s to import and migrate
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    _stop_server(proc)
    pytest.fail(f"mlflow server did not come up: {(tmp / 'server.log').read_text()[-2000:]}")


def _stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the CLI and its uvicorn child
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_server_down_mid_pipeline_then_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    minimal_params(ws, tracking={"uri": uri, "experiment": "server"})
    proc = _start_server(port, tmp_path)
    try:
        run_stage(ws, monkeypatch)
        assert len(runs(uri, "server")) == 1
    finally:
        _stop_server(proc)

    caplog.clear()
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    (ws / "reports" / "summary.md").unlink()
    run_stage(ws, monkeypatch)  # exit 0 is asserted inside
    assert time.monotonic() - start < 30  # no retry storm against a dead server
    assert (ws / "reports" / "summary.md").is_file()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sae sync" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    (pending,) = list_pending(ws)

    proc = _start_server(port, tmp_path)
    try:
        monkeypatch.chdir(ws)
        result = CliRunner().invoke(sync_command, [])
        assert result.exit_code == 0, result.output
        assert not pending.path.exists()
        found = runs(uri, "server")
        assert len(found) == 2
        synced = [r for r in found if r.data.tags.get("sae.record_id") == pending.record.record_id]
        assert synced[0].data.params["tracking.uri"] == uri and synced[0].data.metrics["fvu"] == 0.25
    finally:
        _stop_server(proc)


def test_store_refusing_the_run_keeps_report_and_saves_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ws = fabricate_workspace(tmp_path / "ws")
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a sqlite database" * 100)  # reachable path, broken store
    caplog.set_level(logging.INFO)
    run_stage(ws, monkeypatch, f"tracking.uri=sqlite:///{bad}", "report.frontier=false")
    (p,) = list_pending(ws)
    assert "MLflow refused the run" in (ws / "reports" / "summary.md").read_text()
    shipped = next(p.path / rel for rel, dest in p.record.artifacts if rel.endswith("summary.md"))
    assert "MLflow refused the run" in shipped.read_text()  # the bundle carries the corrected report
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sae sync" in warnings[0], warnings
