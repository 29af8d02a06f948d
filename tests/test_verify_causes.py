"""``sae verify`` names why a rerun differs instead of being fooled or tripping: a commit whose params or
code differ from its ``dvc.lock`` is stopped, a different resolved dtype is a named cause whose tolerances
were calibrated on the default pipeline, and the training world size is recorded and named."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bench_load import load_benchmark
from click.testing import CliRunner
from verify_repo import make_verify_repo

from pipeline.lockcheck import dvc_hash, lock_drift
from pipeline.verify import compare, format_report

CALIBRATION = (Path(__file__).resolve().parents[1] / "benchmarks" / "results"
               / "cpu-xeon-amx-2core-2026-12-05-verify-calibration.json")


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with synthetic activations and small train params (bf16 autocast), nothing committed."""
    return make_verify_repo(tmp_path, monkeypatch, "bfloat16")


def _commit(message: str, *paths: str) -> None:
    subprocess.run(["git", "add", "params.yaml", *paths], check=True)
    subprocess.run(["git", "commit", "-qm", message], check=True)


def _md5(path: str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _set(key: str, value: object) -> None:
    p = yaml.safe_load(Path("params.yaml").read_text())
    section, name = key.split(".")
    p[section][name] = value
    Path("params.yaml").write_text(yaml.safe_dump(p))


# ---- params.yaml and code against dvc.lock --------------------------------------------------------------


def test_a_params_change_committed_without_rerunning_is_named_not_excused(repo: Path) -> None:
    from stages.train import command as train
    from stages.verify import command as verify

    assert CliRunner().invoke(train, []).exit_code == 0
    Path("code.py").write_text("X = 1\n")
    # What `dvc repro` writes: each stage's params as it read them (a whole section or one key) and dep hashes.
    p = yaml.safe_load(Path("params.yaml").read_text())
    lock = {"schema": "2.0", "stages": {"train": {
        "cmd": "sae train", "deps": [{"path": "code.py", "hash": "md5", "md5": _md5("code.py"), "size": 6},
                                     {"path": "data/activations", "hash": "md5", "md5": "0" * 32 + ".dir"}],
        "params": {"params.yaml": {"train": p["train"], "sae.k": 4, "seed": 0}}}}}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    _commit("trained", "metrics", "results", "code.py", "dvc.lock")
    res = CliRunner().invoke(verify, ["--no-rerun"])
    assert res.exit_code == 0, res.output

    _set("train.dtype", "float32")  # committed without `dvc repro` ...
    _commit("float32")
    assert CliRunner().invoke(train, []).exit_code == 0  # ... and rerun by hand: only the environment moved?
    res = CliRunner().invoke(verify, ["--no-rerun"])
    assert res.exit_code == 1, res.output
    assert "  params.yaml differs from dvc.lock: train.dtype (bfloat16 -> float32); run dvc repro" in res.output
    assert "within tolerance" not in res.output and "Nothing compared" in res.output

    _set("train.dtype", "bfloat16")
    Path("code.py").write_text("X = 2\n")  # code changed without rerunning: the same
    _commit("code", "code.py")
    res = CliRunner().invoke(verify, ["--no-rerun"])
    assert res.exit_code == 1 and "  code differs from dvc.lock: code.py; run dvc repro" in res.output, res.output
    assert "params.yaml differs" not in res.output

    Path("code.py").write_text("X = 1\n")  # back to what the lock records
    _commit("code back", "code.py")
    res = CliRunner().invoke(verify, ["--no-rerun"])  # the workspace still holds the float32 rerun: tolerances
    assert "params and code: as its dvc.lock records them" in res.output and "Cause: resolved dtype differs: " \
        "train.dtype (bfloat16 vs float32)." in res.output, res.output


def test_lock_drift_reads_sections_keys_and_folders_as_dvc_hashes_them() -> None:
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    files = {"pkg/a.py": b"a = 1\n", "pkg/sub/b.py": b"b = 2\n", "one.py": b"x\n"}
    tree = Tree()  # DVC's own folder hash, to check ours against
    for path in ("a.py", "sub/b.py"):
        tree.add(tuple(path.split("/")), None, HashInfo("md5", hashlib.md5(files[f"pkg/{path}"]).hexdigest()))
    tree.digest()
    assert dvc_hash({"a.py": files["pkg/a.py"], "sub/b.py": files["pkg/sub/b.py"]}) == tree.hash_info.value

    lock = {"stages": {"a": {"params": {"params.yaml": {"train": {"lr": 0.004, "betas": [0.9, 0.999]}, "sae.k": 32}},
                             "deps": [{"path": "pkg", "hash": "md5", "md5": tree.hash_info.value, "nfiles": 2},
                                      {"path": "one.py", "hash": "md5", "md5": hashlib.md5(b"x\n").hexdigest()},
                                      {"path": "data/tokens", "hash": "md5", "md5": "f" * 32 + ".dir"}]},
                       "report": {"params": {"params.yaml": {"report.top_features": 5}}}}}
    params = {"train": {"lr": 0.004, "betas": [0.9, 0.999]}, "sae": {"k": 32}, "report": {"top_features": 20}}

    def check(params: dict, files: dict, stages: list[str] | None = None) -> list[str]:
        drift = lock_drift(lock, lambda f: params, files.get,
                           lambda d: [p for p in files if p.startswith(d + "/")], stages)
        return drift.describe()

    assert check(params, files, ["a"]) == []  # report's stale key is not a stage whose metrics are checked
    assert check(params, files) == ["params.yaml differs from dvc.lock: report.top_features (5 -> 20); run dvc repro"]
    moved = {"train": {"lr": 0.001, "betas": [0.9, 0.999], "new": True}, "sae": {}}
    assert check(moved, files, ["a"]) == [
        "params.yaml differs from dvc.lock: train.lr (0.004 -> 0.001), train.new ((absent) -> true), "
        "sae.k (32 -> (absent)); run dvc repro"]
    assert check(params, {**files, "pkg/c.py": b""}, ["a"]) == ["code differs from dvc.lock: pkg; run dvc repro"]
    assert check(params, {**files, "one.py": b"y\n"}, ["a"]) == ["code differs from dvc.lock: one.py; run dvc repro"]
    # Fewer files than DVC counted: byte-code caches in the hashed workspace, not a change.
    assert check(params, {k: v for k, v in files.items() if k != "pkg/sub/b.py"}, ["a"]) == []


# ---- a different resolved dtype: calibrated on the default pipeline ---------------------------------------


def test_dtype_tolerances_leave_twice_the_default_pipelines_bf16_vs_fp32_difference() -> None:
    """The calibration (benchmarks/results): the default pipeline run with `auto` (bf16 on an AMX CPU) and with
    train.dtype and interpret.encode_dtype float32 (what `auto` picks on a CPU without bf16)."""
    cal = json.loads(CALIBRATION.read_text())
    for (a, rec), (b, now) in [(("bfloat16", cal["bfloat16"]), ("float32", cal["float32"])),
                               (("float32", cal["float32"]), ("bfloat16", cal["bfloat16"]))]:
        v = compare(rec, now)
        assert v.ok, format_report(v)
        assert v.causes == [f"resolved dtype differs: interpret.encode_dtype ({a} vs {b})",
                            f"resolved dtype differs: train.dtype ({a} vs {b})"]
        assert f"Cause: resolved dtype differs: interpret.encode_dtype ({a} vs {b}); " in format_report(v)
        for row in v.rows:
            if row.status == "within" and row.rule.kind == "close":
                room = row.rule.abs + row.rule.rel * abs(row.recorded)
                assert abs(row.now - row.recorded) <= room / 2, (row.metric, row.recorded, row.now, row.rule.describe())


# ---- the training world size ------------------------------------------------------------------------------


def _sae_train(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "stages", "train", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_world_size_is_recorded_and_named_as_the_cause(repo: Path) -> None:
    from stages.verify import command as verify

    _set("train.dtype", "float32")
    _sae_train("--set", "train.processes=2")
    assert json.loads(Path("results/train.json").read_text())["environment"]["train.world_size"] == "2"
    _commit("2 processes", "metrics", "results")
    _sae_train()  # one process, otherwise the same environment
    env = json.loads(Path("results/train.json").read_text())["environment"]
    assert env["train.world_size"] == "1"
    res = CliRunner().invoke(verify, ["--no-rerun"])
    assert "Cause: world size differs (2 vs 1)." in res.output, res.output
    assert res.exit_code == 0 and "Bit-exact stages: none." in res.output, res.output


def test_calibration_script_writes_both_runs_and_the_room(tmp_path: Path) -> None:
    mod = load_benchmark("verify_calibration")
    cal = json.loads(CALIBRATION.read_text())
    for run in ("bfloat16", "float32"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "train.json").write_text(json.dumps(cal[run]["train"]))
    mod.main([str(tmp_path / "bfloat16"), str(tmp_path / "float32"), "--out", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["float32"]["train"] == cal["float32"]["train"]
    loss = next(r for r in out["differences"] if r["metric"].endswith("/loss"))
    assert loss["room"] == pytest.approx(0.05 * loss["bfloat16"] / abs(loss["float32"] - loss["bfloat16"]))
    assert out["min_room"] == min(r["room"] for r in out["differences"] if r.get("room"))
