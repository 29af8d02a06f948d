"""benchmarks/train.py: the tiny CPU mode runs and writes a complete JSON report; the roofline model by hand.
benchmarks/peers.py: its tiny run (a stand-in peer, nothing installed) and its error without the peers."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
from bench_load import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("train")


def _positive(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


def test_floor_model_hand_value(bench: ModuleType) -> None:
    card = {"matmul_tflops": 1.0, "copy_bandwidth_gbs": 1.0}  # 1e12 FLOP/s, 1e9 B/s
    N, d, n, k = 2, 1, 1, 1
    # params = 2·d·n + n + d = 4; memory = 34·4 + 12·N·d = 160 B -> 160 ns
    # sparse FLOPs = 2·N·d·n + 8·N·k·d = 4 + 16 = 20 -> 0.02 ns; dense_bwd = 6·2 + 6·2 = 24 -> 0.024 ns
    got = bench.floor_tok_s(card, N, d, n, k)
    assert got["floor_tok_s"] == pytest.approx(2 / (160e-9 + 20e-12))
    assert got["floor_dense_bwd_tok_s"] == pytest.approx(2 / (160e-9 + 24e-12))


def test_tiny_cpu_run_writes_json_with_positive_numbers(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    bench.main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["device"]["kernel_backend"] == "torch"  # auto never picks the Triton interpreter
    assert _positive(report["card"]["matmul_tflops"]) and _positive(report["card"]["copy_bandwidth_gbs"])
    (row,) = report["results"]
    assert (row["d"], row["n_latents"], row["k"], row["batch"]) == (*bench.TINY_SIZES[0], bench.TINY_BATCHES[0])
    assert _positive(row["floor_tok_s"]) and _positive(row["floor_dense_bwd_tok_s"])
    assert row["floor_tok_s"] > row["floor_dense_bwd_tok_s"]  # the sparse backward does fewer FLOPs
    from pipeline.sae import ARCHS

    assert set(row["variants"]) == {"reference", "kernels"} | {f"sae:{a}" for a in ARCHS}
    for name, v in row["variants"].items():
        assert _positive(v["tok_s"]) and _positive(v["step_ms"]), name
        assert v["tok_s"] == pytest.approx(row["batch"] / (v["step_ms"] / 1e3)), name
        assert v["peak_gpu_mem_bytes"] is None  # CPU: no GPU memory to report
    assert _positive(row["kernels_speedup_vs_reference"])
    loader = row["loader"]
    assert _positive(loader["iter_batches_tok_s"]) and _positive(loader["train_batches_tok_s"])
    assert _positive(loader["ratio_to_kernels_step"])


def test_verify_benchmark_tiny_run(tmp_path: Path) -> None:
    mod = load_benchmark("verify")
    report = mod.main(["--tiny", "--out", str(tmp_path / "verify.json")])
    assert json.loads((tmp_path / "verify.json").read_text()) == report
    assert _positive(report["sha256_gb_s"]) and report["shards"] == 4
    for mode in ("sequential", "shuffled", "train_batches"):
        assert _positive(report[mode]["verified_gb_s"]) and _positive(report[mode]["plain_gb_s"]), mode


def test_numerics_benchmark_compares_both_mkl_modes(tmp_path: Path) -> None:
    mod = load_benchmark("numerics")
    from pipeline.numerics import mkl_cbwr_mode

    if mkl_cbwr_mode() is None:
        pytest.skip("no MKL in this torch build")
    report = mod.main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "r.json")])
    assert report["modes"] == {"default": "OFF", "strict": "AUTO,STRICT"}  # each process really ran its mode
    for w in ("gemm_s", "forward_s"):
        assert _positive(report[w]["default"]) and _positive(report[w]["strict"])
        assert report[w]["strict_over_default"] == pytest.approx(report[w]["strict"] / report[w]["default"])
    assert json.loads((tmp_path / "r.json").read_text()) == report


def _load_peers() -> ModuleType:
    return load_benchmark("peers")


def test_peers_benchmark_tiny_run_records_machine_and_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No install, no network: a stand-in peer (our own dense step) takes the place of sae-lens / sparsify.
    mod = _load_peers()
    monkeypatch.setattr(mod, "peers_importable", lambda: True)
    monkeypatch.setitem(mod.VARIANTS, "stand_in", partial(mod.ours, kernels="torch"))
    out = tmp_path / "peers.json"
    report = mod.main(["--tiny", "--peers", "stand_in", "--rounds", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    m = report["machine"]
    assert m["threads"] == 2 and m["cpu_model"] and len(m["load_average"]) == 3
    assert [r["dtype"] for r in report["results"]] == ["fp32", "bf16"]
    for row in report["results"]:
        assert set(row["variants"]) == {"ours", "ours_dense", "stand_in"}
        assert all(_positive(v["tok_s"]) and len(v["tok_s_rounds"]) == 2 for v in row["variants"].values())
        assert row["best_peer"] == "stand_in"
        tok = {k: v["tok_s"] for k, v in row["variants"].items()}
        assert row["ratio_ours_to_best_peer"] == pytest.approx(tok["ours"] / tok["stand_in"])


def test_peers_benchmark_without_peers_and_no_install_is_one_error_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load_peers()
    monkeypatch.setattr(mod, "peers_importable", lambda: False)
    monkeypatch.setattr(mod, "VENV", tmp_path / "no-venv")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--tiny", "--no-install", "--out", "-"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-venv: no environment with sae-lens, eai-sparsify" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "no-venv").exists()  # nothing installed
