"""The default local MLflow store as a user meets it: no empty `Default` experiment pointing at a folder
that does not exist, and the README's `search_runs` snippet prints the metrics, not `[1 rows x 5 columns]`."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from tracking_fixtures import fabricate_workspace

from stages.report import command as report_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fabricated workspace whose report logged one run into a fresh ``mlflow.db`` at its root
    (once for the module: a new store runs MLflow's migrations)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
            mp.delenv(k, raising=False)
        ws = fabricate_workspace(tmp_path_factory.mktemp("mlflow") / "ws")
        mp.chdir(ws)
        res = CliRunner().invoke(report_command, ["--params", str(ws / "params.yaml")])
        assert res.exit_code == 0, (res.output, res.exception)
        yield ws


def test_a_new_local_store_has_no_empty_default_experiment(workspace: Path) -> None:
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments()] == ["sae-pipeline"]  # active ones
    assert client.get_experiment_by_name("sae-pipeline").artifact_location == (workspace / "mlartifacts").as_uri()


def test_a_default_experiment_with_runs_is_kept(tmp_path: Path) -> None:
    from pipeline.tracking.store import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_run("0")  # someone logged into Default on purpose
    experiment_id(client, "sae-pipeline", uri, tmp_path)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "sae-pipeline"]


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "mlflow.search_runs" in b]
    assert len(found) == 1, "the README has one search_runs snippet"
    return found[0]


def test_readme_search_runs_snippet_prints_every_column(workspace: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_readme_snippet(), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["run", "arch", "k", "L0", "FVU", "CE", "recovered", "commit"], lines
    assert len(lines) == 2 and "rows x" not in out.getvalue() and "..." not in out.getvalue()
    row = lines[1].split()
    assert row[1:6] == ["topk", "32", "32.0", "0.25", "0.9"], row  # the fabricated evaluate headline
