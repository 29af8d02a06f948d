"""Cross-machine reproduction made explicit: every stage records the environment its numbers
came from, ``sae verify`` compares a rerun with a commit's recorded metrics (bit-exact in the same
environment, per-metric tolerances otherwise), and ``numerics.portable`` forces the portable path."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from verify_repo import HOOK, make_verify_repo

from pipeline.environment import cpu_has_fast_bf16, environment
from pipeline.numerics import (
    PORTABLE_ENV,
    apply_numerics,
    child_environ,
    portable_requested,
    request_reproducible_blas,
)
from pipeline.params import Params, load_params, to_dict
from pipeline.verify import TOLERANCES, compare, format_report

# ---- the comparison, on hand-made metrics ------------------------------------------------------------


def _stage(env: dict[str, str], **metrics: object) -> dict:
    return {"environment": env, HOOK: dict(metrics)}


ENV = {"cpu": "X", "train.dtype": "float32"}


def test_same_environment_demands_bit_exact_values() -> None:
    rec = {"train": _stage(ENV, **{"fvu_batch@1": 0.25, "steps": 20})}
    assert compare(rec, rec).ok and compare(rec, rec).exact_stages == ["train"]
    moved = {"train": _stage(ENV, **{"fvu_batch@1": 0.25000000000000006, "steps": 20})}
    v = compare(rec, moved)
    assert not v.ok and v.exact_stages == ["train"]
    (row,) = [r for r in v.rows if r.status != "identical"]
    assert row.metric == f"train/{HOOK}/fvu_batch@1" and row.status == "out" and row.rule.kind == "exact"


def test_other_environment_applies_each_metrics_tolerance() -> None:
    other = {**ENV, "train.dtype": "bfloat16"}
    rec = {"train": _stage(ENV, **{"fvu_batch@1": 0.2, "steps": 20}),
           "evaluate": _stage(ENV, **{"fvu@3": 0.3, "ce_clean@2": 6.0})}
    now = {"train": _stage(other, **{"fvu_batch@1": 0.209, "steps": 20}),   # 4.5%: within rel 5%
           "evaluate": _stage(ENV, **{"fvu@3": 0.33, "ce_clean@2": 6.0})}   # 10%: out
    v = compare(rec, now)
    # evaluate's own environment matches, but its input (train's SAE) came from another one.
    assert v.exact_stages == [] and v.environment == [("train", "train.dtype", "float32", "bfloat16")]
    status = {r.metric.split("/")[-1]: r.status for r in v.rows}
    assert status == {"fvu_batch@1": "within", "steps": "identical", "fvu@3": "out", "ce_clean@2": "identical"}
    assert not v.ok
    report = format_report(v)
    assert "train.dtype" in report and f"evaluate/{HOOK}/fvu@3" in report and "NO (rel 0.05)" in report
    assert f"train/{HOOK}/steps" not in report  # identical rows are listed only with --all


def test_portable_runs_on_another_cpu_are_held_to_bit_exact() -> None:
    portable = {"numerics.portable": "true", "mkl_cbwr": "COMPATIBLE,STRICT", "cpu_capability": "DEFAULT",
                "threads": "1", "cpu": "AMD EPYC", "cpu_flags": "avx2 avx512f avx512_bf16"}
    intel = {**portable, "cpu": "Intel Xeon", "cpu_flags": "avx2 avx512f amx_bf16"}
    rec = {"train": {"environment": portable, HOOK: {"loss": 1.0}}}
    v = compare(rec, {"train": {"environment": intel, HOOK: {"loss": 1.0 + 1e-9}}})
    assert v.exact_stages == ["train"] and not v.ok  # the portable promise: the same bits on another CPU
    assert "(portable: ignored)" in format_report(v) and "must be bit-exact" in format_report(v)
    fast = {**intel, "numerics.portable": "false", "mkl_cbwr": "AUTO,STRICT", "cpu_capability": "AVX512"}
    assert compare(rec, {"train": {"environment": fast, HOOK: {"loss": 1.0 + 1e-9}}}).ok  # default path: tolerance


def test_steer_verdict_is_checked_by_its_interval_and_reversals() -> None:
    def steer(mean: float, verdict: str, per_feature: float) -> dict:
        return {"environment": {"cpu": "A"}, "features": {"7": {"hm@2": per_feature}}, "overall": {
            "test_hm@2": {"add": {"mean": mean, "ci95_low": 0.1, "ci95_high": 0.3}},
            "sae_minus_dim_hm@3": {"mean": -0.05, "ci95_low": -0.2, "ci95_high": 0.1, "verdict": verdict}}}

    rec = {"steer": steer(0.2, "is indistinguishable from", 0.5)}
    other = {"steer": {**steer(0.28, "loses to", 0.9), "environment": {"cpu": "B"}}}
    rows = {r.metric: r for r in compare(rec, other).rows}
    assert rows["steer/overall/test_hm@2/add"].status == "within"  # 0.28 inside the recorded [0.1, 0.3]
    assert rows["steer/overall/sae_minus_dim_hm@3/verdict"].status == "within"  # weaker, not reversed
    assert rows["steer/features/7/hm@2"].status == "unchecked"
    rec_beats = {"steer": steer(0.2, "beats", 0.5)}
    outside = {"steer": {**steer(0.35, "loses to", 0.5), "environment": {"cpu": "B"}}}
    rows = {r.metric: r for r in compare(rec_beats, outside).rows}
    assert rows["steer/overall/test_hm@2/add"].status == "out"
    assert rows["steer/overall/sae_minus_dim_hm@3/verdict"].status == "out"  # beats -> loses to


def test_a_metric_that_disappears_is_out_of_tolerance() -> None:
    rec = {"evaluate": _stage(ENV, **{"fvu@3": 0.3, "l0@2": 4.0})}
    v = compare(rec, {"evaluate": _stage({**ENV, "cpu": "Y"}, **{"fvu@3": 0.3})})
    assert [(r.metric.split("/")[-1], r.status) for r in v.rows] == [("fvu@3", "identical"), ("l0@2", "out")]


def test_every_tolerance_says_why() -> None:
    assert all(t.why and t.kind in ("exact", "close", "interval", "verdict", "unchecked") for t in TOLERANCES)
    assert TOLERANCES[-1].pattern == ""  # a fallback: every metric has a rule


# ---- the recorded environment ---------------------------------------------------------------------------


def test_environment_is_strings_and_the_same_twice() -> None:
    env = environment({"train.dtype": "bfloat16", "numerics.portable": False})
    assert env == environment({"train.dtype": "bfloat16", "numerics.portable": False})  # byte-stable metrics
    assert all(isinstance(v, str) for v in env.values())  # never mistaken for metrics (MLflow, report)
    assert env["numerics.portable"] == "false" and env["threads"] == str(torch.get_num_threads())
    assert {"cpu", "cpu_flags", "cpu_capability", "mkl_cbwr", "deterministic", "gpu", "versions.torch"} <= set(env)
    assert ("avx512_bf16" in env["cpu_flags"].split() or "amx_bf16" in env["cpu_flags"].split()) == cpu_has_fast_bf16()
    assert set(environment(compute=False)) == {"python"} | {k for k in env if k.startswith("versions.")}


def test_environment_blocks_become_mlflow_tags_not_metrics(tmp_path: Path) -> None:
    from pipeline.tracking.record import build_record

    (tmp_path / "results").mkdir()
    for stage, env in (("train", {"cpu": "X", "threads": "2", "train.dtype": "bfloat16"}),
                       ("evaluate", {"cpu": "X", "threads": "1"})):
        (tmp_path / "results" / f"{stage}.json").write_text(json.dumps({HOOK: {"fvu@2": 0.5}, "environment": env}))
    record = build_record(tmp_path, {"extract.hooks": [HOOK]}, "e", [HOOK])
    env_tags = {k: v for k, v in record.tags.items() if k.startswith("env.")}
    assert env_tags == {"env.cpu": "X", "env.train.dtype": "bfloat16", "env.train.threads": "2",
                        "env.evaluate.threads": "1"}
    assert not [k for k in record.metrics if "environment" in k]


# ---- the portable switch ----------------------------------------------------------------------------------


def test_portable_params_force_float32_and_the_dense_step(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(Params())))
    p = load_params(path)
    assert (p.model.dtype, p.train.dtype, p.train.kernels, p.interpret.encode_dtype) == ("bfloat16", "auto", "auto", "auto")
    p = load_params(path, ["numerics.portable=true"])
    assert (p.model.dtype, p.train.dtype, p.train.kernels, p.interpret.encode_dtype) == ("float32", "float32", "torch", "float32")


def test_the_sae_command_reads_portable_before_torch(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"numerics": {"portable": True}}))
    assert portable_requested(["train", "--params", str(path)])
    assert portable_requested(["train", f"--params={path}", "--set", "numerics.portable=false"]) is False
    assert portable_requested(["train", "--params", str(tmp_path / "absent.yaml"), "--set=numerics.portable=true"])
    assert portable_requested(["train", "--params", str(tmp_path / "absent.yaml")]) is False
    env: dict[str, str] = {"MKL_CBWR": "AVX2"}
    request_reproducible_blas(env, portable=True)
    assert env == {**PORTABLE_ENV, "MKL_CBWR": "AVX2"}  # the user's own setting wins


def test_a_portable_sae_process_runs_mkl_compatible_and_baseline_kernels(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"numerics": {"portable": True}}))
    code = ("import sys; sys.argv = ['sae', 'train', '--params', sys.argv[1]]; import stages.cli; import torch; "
            "from pipeline.environment import environment; e = environment(); print(e['mkl_cbwr'], e['cpu_capability'])")
    env = {k: v for k, v in child_environ().items() if k not in PORTABLE_ENV}
    out = subprocess.run([__import__("sys").executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out[1] == "DEFAULT" and out[0] in ("COMPATIBLE,STRICT", "none")  # "none": a torch build without MKL


def test_apply_numerics_pins_threads_and_determinism() -> None:
    threads = torch.get_num_threads()
    try:
        apply_numerics(portable=True, threads=None)
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        assert environment()["deterministic"] == "true" and environment()["threads"] == "1"
        apply_numerics(portable=False, threads=None)
        assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1  # left as it is
    finally:
        torch.set_num_threads(threads)
        apply_numerics(portable=False, threads=None)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True


# ---- the check: a stage run twice, bf16 forced on and off ------------------------------------------


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with synthetic activations and train params (float32 forced), nothing committed yet."""
    return make_verify_repo(tmp_path, monkeypatch, "float32")


def _commit(message: str) -> None:
    subprocess.run(["git", "add", "-A", "params.yaml", "metrics", "results"], check=True)
    subprocess.run(["git", "commit", "-qm", message], check=True)


def test_bf16_on_and_off_is_recorded_and_verify_names_the_metrics_that_moved(repo: Path) -> None:
    from stages.train import command as train
    from stages.verify import command as verify

    assert CliRunner().invoke(train, []).exit_code == 0
    _commit("float32")
    fp32 = json.loads(Path("results/train.json").read_text())
    res = CliRunner().invoke(verify, ["--no-rerun"])
    assert res.exit_code == 0 and "every metric must be bit-exact" in res.output, res.output

    res = CliRunner().invoke(train, ["--set", "train.dtype=bfloat16"])
    assert res.exit_code == 0, res.output
    bf16 = json.loads(Path("results/train.json").read_text())
    assert (fp32["environment"]["train.dtype"], bf16["environment"]["train.dtype"]) == ("float32", "bfloat16")
    assert {k for k in fp32["environment"] if fp32["environment"][k] != bf16["environment"][k]} == {"train.dtype"}

    res = CliRunner().invoke(verify, ["--no-rerun"])
    assert any(line.split() == ["train", "train.dtype", "float32", "bfloat16"] for line in res.output.splitlines()), res.output
    moved = [line.split()[0] for line in res.output.splitlines() if line.startswith(f"train/{HOOK}/")]
    assert f"train/{HOOK}/fvu_batch@1" in moved and f"train/{HOOK}/val_fvu@2" in moved, res.output
    assert f"train/{HOOK}/steps" not in moved  # not moved: not listed
    assert "Bit-exact stages: none." in res.output
    # Under another environment the tolerances decide; the exit code says whether all held.
    assert res.exit_code == (1 if " NO (" in res.output else 0), res.output


def test_same_environment_other_result_fails_verify(repo: Path) -> None:
    # The check can fail: a changed number in an unchanged environment is a reproduction failure.
    from stages.train import command as train
    from stages.verify import command as verify

    assert CliRunner().invoke(train, []).exit_code == 0
    _commit("recorded")
    data = json.loads(Path("results/train.json").read_text())
    data[HOOK]["loss"] = data[HOOK]["loss"] * (1 + 1e-12)  # the last bits of one number
    Path("results/train.json").write_text(json.dumps(data))
    res = CliRunner().invoke(verify, ["--no-rerun"])
    assert res.exit_code == 1 and f"train/{HOOK}/loss" in res.output and "NO (exact)" in res.output, res.output


def test_verify_without_committed_metrics_is_one_line_error(repo: Path) -> None:
    from stages.verify import command as verify

    subprocess.run(["git", "add", "params.yaml"], check=True)
    subprocess.run(["git", "commit", "-qm", "params only"], check=True)
    res = CliRunner().invoke(verify, [])
    assert res.exit_code == 2 and res.output.startswith("error: --rev HEAD: commit ") and "no results/*.json" in res.output


def test_nothing_recorded_compares_the_workspace_run_with_a_rerun(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh clone after `dvc repro`: the commit records nothing, the workspace's results are one run of it."""
    from stages import verify
    from stages.train import command as train

    subprocess.run(["git", "add", "params.yaml"], check=True)
    subprocess.run(["git", "commit", "-qm", "params only"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert CliRunner().invoke(train, []).exit_code == 0
    reruns = []

    def rerun(root: Path, commit: str, stages: list[str], keep: bool) -> dict:  # a bit-identical rerun in a clone
        reruns.append((commit, stages))
        return verify.read_metrics(root / "results")

    monkeypatch.setattr(verify, "rerun", rerun)
    res = CliRunner().invoke(verify.command, [])
    assert res.exit_code == 0, res.output
    assert f"the workspace's results (nothing recorded at {head[:12]}" in res.output and reruns == [(head, ["train"])]
    assert "every metric must be bit-exact" in res.output
    res = CliRunner().invoke(verify.command, ["--no-rerun"])  # the workspace against itself: nothing to check
    assert res.exit_code == 2 and "no results/*.json" in res.output


# ---- the whole thing: rerun in a clone (dvc repro) ----------------------------------------------------------


@pytest.mark.slow
def test_verify_reruns_a_commit_in_a_clone_bit_exact(tmp_path: Path, tiny_llama: Path, labelled_corpus: Path) -> None:
    from e2e import make_repo, run

    from pipeline.testing import tiny_params

    repo = make_repo(tmp_path / "repo", tiny_params(tiny_llama, labelled_corpus, [HOOK]))
    run(["dvc", "repro", "extract"], repo)  # prepare + extract: the stages whose metrics are checked
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "recorded"], repo)
    res = run(["sae", "verify"], repo, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "every metric must be bit-exact" in res.stdout and "0 out of tolerance" in res.stdout, res.stdout
    assert "params and code: as its dvc.lock records them" in res.stdout  # a real dvc.lock: no false drift
    assert not (repo / "mlflow.db").exists()  # nothing logged: report is not rerun
