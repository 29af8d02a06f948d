"""Data-parallel training and extraction under torchrun, on CPU with gloo: 2 (or 4) processes, 127.0.0.1 only.

2 processes train the SAE one process trains on the same batches (every architecture, to float tolerance), and 1,
2 and 4 processes the same SAEs at a realistic size (within a stated bound); a killed 2-process run resumes to the
same bits, reading its checkpoint once; another number of processes is refused in one line; 2-process extraction
writes the one-process dataset byte for byte; ``train.processes: 2`` makes ``sae train`` start them;
benchmarks/distributed.py's tiny run.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from dist_worker import PAIRED_VARIANTS, SEED, TRITON_VARIANTS, VARIANTS, sae_config, train_params

from pipeline import distributed
from pipeline.activations import open_activations
from pipeline.checkpoint import CHECKPOINT_FILE
from pipeline.errors import UserError
from pipeline.params import Params, to_dict
from pipeline.sae import load_sae
from pipeline.synthetic import write_synthetic_activations
from pipeline.train import train_sae
from stages.cli import main
from stages.launch import command_line

WORKER = Path(__file__).with_name("dist_worker.py")
CURVE = ("loss", "l0", "fvu", "dead_fraction", "dense_fraction")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path | None = None, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on 127.0.0.1 (one thread per process: the CI box has 2 cores)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                          text=True, timeout=300)


def weights(d: Path) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in load_sae(d).state_dict().items()}


def curve(path: Path) -> np.ndarray:
    with open(path) as f:
        return np.array([[float(r[c]) for c in CURVE] for r in csv.DictReader(f)])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("acts") / "train"
    # Small shards so the shuffled batches mix shards.
    write_synthetic_activations(root, n_tokens=2048, d_model=16, n_features=48, k_true=3, seed=1, shard_rows=700,
                                dtype="float32")
    return root


@pytest.fixture(scope="module")
def two_processes(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`LONG_RUNS` trained once by 2 processes (uninterrupted)."""
    out = tmp_path_factory.mktemp("ddp")
    res = torchrun(str(WORKER), "--data", str(data), "--out", str(out), "--variants", ",".join(LONG_RUNS))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# 24 steps, to 1e-6: the dead-latent record and AuxK over many steps (topk, batchtopk and its threshold EMA) and the
# 2023 recipe's resampling from the gathered batch (steps 10-20), which the realistic run below is too short for;
# every architecture is there.
LONG_RUNS = ("topk", "batchtopk", "relu_l1_2023")


@pytest.mark.parametrize("name", LONG_RUNS)
def test_two_processes_train_the_one_process_sae(name: str, data: Path, two_processes: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    train_sae(open_activations(data), sae_config(name), train_params(name), one, tmp_path / "ckpt", seed=SEED,
              curve_path=tmp_path / "one.csv")
    two = two_processes / name
    # It was a 2-process run (each process half of every batch), not 2 copies of a one-process run.
    assert json.loads((two / "cfg.json").read_text())["training"]["world_size"] == 2
    state = torch.load(two_processes / f"{name}_ckpt" / CHECKPOINT_FILE, weights_only=False)
    assert state["complete"] and state["cursor"]["world_size"] == 2
    ref, got = weights(one), weights(two)
    assert ref.keys() == got.keys()
    for k in ref:  # measured: at most 1.2e-7 apart after 24 steps (float summation order only)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    np.testing.assert_allclose(curve(two_processes / f"{name}.csv"), curve(tmp_path / "one.csv"), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide") / "train"
    write_synthetic_activations(root, n_tokens=4096, d_model=256, n_features=1024, k_true=8, seed=5, shard_rows=512,
                                dtype="float32")
    return root


# The bound, per weight tensor W: ||W_N - W_1|| / ||W_1|| (Frobenius) after REALISTIC's 3 steps (d_in 256 -> d_sae
# 4096, batches of 1,024, fp32). Measured at N = 2 and 4 alike (2-core Xeon): <= 7.5e-6 for every architecture but
# two, max |difference| <= 8e-5 (weights of size ~1); float summation order only, which Adam carries up to a few
# times lr in a weight whose gradient is mostly rounding (it divides by the gradient's RMS). Two differ more, the same
# before the loss's collectives were coalesced: matryoshka_batchtopk (dictionary_learning weighting, full AuxK)
# 3.0e-3, in ~1,400 of the 4,096 latents, although its first step's gradients agree within 2e-7; relu_l1_2023 at
# lr 0.05: 9.3e-4. Transcoders (here of the identity map) start from a zero decoder (sparsify's initialisation), which
# after 3 steps is still small (norm 1.3) and made of Adam's first, gradient-normalised steps: 1.5e-3 in W_dec
# (elements 1e-3 apart), N = 2 and 4 as far from each other as from 1.
REALISTIC_BOUND = {"matryoshka_batchtopk": 1e-2, "relu_l1_2023": 1e-2, "transcoder": 1e-2, "skip_transcoder_batchtopk": 1e-2}
REALISTIC_DEFAULT_BOUND = 5e-5


def test_one_two_and_four_processes_train_the_same_sae_at_a_realistic_size(wide_data: Path, tmp_path: Path) -> None:
    # One launch per process count, every architecture in it: 256 -> 4,096 latents, every gradient sum over 2 or 4
    # processes, a latent's rows from 2 or 4 lanes, AuxK and BatchTopK's threshold over the global batch; transcoders
    # on their (input, target) pairs.
    names = [v for v in VARIANTS if v not in TRITON_VARIANTS] + list(PAIRED_VARIANTS)
    target = wide_data  # the transcoders' target: the identity map, a learnable one on these rows
    for n in (2, 4):
        res = torchrun(str(WORKER), "--data", str(wide_data), "--out", str(tmp_path / str(n)), "--d-sae", "4096",
                       "--realistic", "--variants", ",".join(names), "--target", str(target), nproc=n)
        assert res.returncode == 0, res.stderr[-3000:]
    ds = open_activations(wide_data)
    measured: dict[str, str] = {}
    for name in names:
        train_sae(ds, sae_config(name, 256, 4096), train_params(name, realistic=True), tmp_path / "1" / name,
                  tmp_path / "1" / f"{name}_ckpt", seed=SEED, curve_path=tmp_path / "1" / f"{name}.csv",
                  **({"target": open_activations(target)} if name in PAIRED_VARIANTS else {}))
        ref = weights(tmp_path / "1" / name)
        rel, top = [], []
        for n in (2, 4):
            assert json.loads((tmp_path / str(n) / name / "cfg.json").read_text())["training"]["world_size"] == n
            got = weights(tmp_path / str(n) / name)
            assert got.keys() == ref.keys()
            rel.append(max(float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ref))
            top.append(max(float((got[k] - ref[k]).abs().max()) for k in ref))
            if name not in REALISTIC_BOUND:  # the logged curve too: loss, L0, FVU, dead and dense fractions
                np.testing.assert_allclose(curve(tmp_path / str(n) / f"{name}.csv"), curve(tmp_path / "1" / f"{name}.csv"),
                                           rtol=1e-4, atol=1e-5, err_msg=f"{name}, {n} processes")
        measured[name] = f"relative {rel[0]:.1e} / {rel[1]:.1e}, max |diff| {top[0]:.1e} / {top[1]:.1e}"
        assert max(rel) <= REALISTIC_BOUND.get(name, REALISTIC_DEFAULT_BOUND), (name, measured[name])
    print("\n".join(f"{k}: N = 2 / 4 against 1 process: {v}" for k, v in measured.items()))


@pytest.mark.slow  # Triton's interpreter: ~1 min
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_two_processes_on_the_triton_kernels_train_the_one_process_sae(data: Path, tmp_path: Path) -> None:
    # One process (a world of one under torchrun is a plain run), then two; the kernels are interpreted on CPU.
    runs = {n: torchrun(str(WORKER), "--data", str(data), "--out", str(tmp_path / str(n)), "--variants",
                        ",".join(TRITON_VARIANTS), nproc=n, TRITON_INTERPRET="1") for n in (1, 2)}
    for res in runs.values():
        assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "2" / "topk_triton" / "cfg.json").read_text())["training"]["kernels"] == "triton"
    for name in TRITON_VARIANTS:
        ref, got = weights(tmp_path / "1" / name), weights(tmp_path / "2" / name)
        for k in ref:  # measured: 1.2e-7 apart after 24 steps
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


def test_killed_two_process_run_resumes_bit_identical(data: Path, two_processes: Path, tmp_path: Path) -> None:
    killed = torchrun(str(WORKER), "--data", str(data), "--out", str(tmp_path), "--variants", "topk", "--kill-at", "13")
    assert killed.returncode != 0
    ckpt = tmp_path / "topk_ckpt"
    state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 10 and not state["complete"] and state["cursor"]["world_size"] == 2
    assert not (tmp_path / "topk" / "sae.safetensors").exists()
    # One process may not continue a 2-process run: one line, naming the checkpoint and both counts.
    with pytest.raises(UserError, match=r"state\.pt: written by a run of 2 processes, this run has 1; resume with 2 "
                                        r"processes"):
        train_sae(open_activations(data), sae_config("topk"), train_params("topk"), tmp_path / "topk", ckpt, seed=SEED)
    # The checkpoint is read once, by rank 0, and sent to rank 1, which needs no copy of its own (here, as on
    # another machine without a shared filesystem, its checkpoint folder is elsewhere and empty).
    reads = tmp_path / "reads.log"
    resumed = torchrun(str(WORKER), "--data", str(data), "--out", str(tmp_path), "--variants", "topk",
                       "--rank1-checkpoints", str(tmp_path / "elsewhere"), "--load-log", str(reads))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reads.read_text().splitlines() == [f"0 {ckpt / CHECKPOINT_FILE}"]  # on the old code, once per process
    assert not (tmp_path / "elsewhere" / CHECKPOINT_FILE).exists()  # only rank 0 writes
    ref, got = weights(two_processes / "topk"), weights(tmp_path / "topk")
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert (tmp_path / "topk.csv").read_text() == (two_processes / "topk.csv").read_text()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_process_extraction_writes_the_one_process_dataset(tiny_workspace: Path) -> None:
    for stage in ("prepare", "extract"):
        res = CliRunner().invoke(main, [stage])
        assert res.exit_code == 0, res.output
    root = tiny_workspace / "data/activations"
    one, one_metrics = _tree(root), json.loads(Path("results/extract.json").read_text())
    assert len([k for k in one if k.startswith("train/") and k.endswith(".parquet")]) == 4  # 2 per process
    for p in [root, Path("results/extract.json")]:
        subprocess.run(["rm", "-rf", str(p)], check=True)
    log = tiny_workspace / "shards.log"
    res = torchrun(str(WORKER), "--shard-log", str(log), "extract", cwd=tiny_workspace)  # = sae extract, logged
    assert res.returncode == 0, res.stderr[-3000:]
    # Shards, sidecars and manifests (written once, by rank 0); not the resume state, whose fingerprint holds the
    # numerics in force (here 1 thread per process and the `sae` command's MKL mode, vs this process's).
    two = _tree(root)
    two.pop("_extract_state.json"), one.pop("_extract_state.json")
    assert two == one
    written = sorted((line.split()[0], Path(line.split()[1]).parts[-2], int(line.split()[2]))
                     for line in log.read_text().splitlines())
    assert written == [("0", "train", 0), ("0", "train", 2), ("0", "validation", 0), ("1", "train", 1), ("1", "train", 3)]
    two_metrics = json.loads(Path("results/extract.json").read_text())
    assert {k: two_metrics[k] for k in ("tokens", "hooks")} == {k: one_metrics[k] for k in ("tokens", "hooks")}


HOOK = "layers.2.resid_post"


@pytest.fixture()
def train_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for split, n, sample in (("train", 1024, 0), ("validation", 256, 1)):
        write_synthetic_activations(Path("data/activations") / split / HOOK, n, 16, n_features=24, k_true=2, seed=4,
                                    sample_seed=sample, hook=HOOK, dtype="float16", shard_rows=500, split=split)
    p = to_dict(Params())
    p["extract"]["hooks"] = [HOOK]
    p["sae"].update(arch="topk", expansion=4, k=4)
    p["train"].update(device="cpu", dtype="float32", batch_size=64, lr=3e-3, n_tokens=None, log_every=4, val_every=8,
                      val_tokens=256, checkpoint_every=5, dead_window_tokens=256)
    Path("params.yaml").write_text(yaml.safe_dump(p))
    return tmp_path


def sae_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def test_train_processes_param_starts_the_processes(train_workspace: Path) -> None:
    res = CliRunner().invoke(main, ["train"])
    assert res.exit_code == 0, res.output
    one, one_metrics = weights(Path("models/sae") / HOOK), json.loads(Path("results/train.json").read_text())[HOOK]
    res = sae_cli("train", "--set", "train.processes=2")  # what `dvc repro` runs, with the switch in params.yaml
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((Path("models/sae") / HOOK / "cfg.json").read_text())
    assert cfg["training"]["world_size"] == 2
    two, two_metrics = weights(Path("models/sae") / HOOK), json.loads(Path("results/train.json").read_text())[HOOK]
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    assert two_metrics["steps"] == one_metrics["steps"] == 16
    assert two_metrics["val_fvu@2"] == pytest.approx(one_metrics["val_fvu@2"], rel=1e-4)


def test_a_failing_process_is_one_error_line(train_workspace: Path) -> None:
    res = sae_cli("train", "--set", "train.processes=2", "--set", "train.batch_size=63")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]  # once, not once per process
    assert errors == ["error: train.batch_size: 63 is not divisible by the 2 training processes"]


def test_a_resume_refused_on_every_process_is_one_line(train_workspace: Path) -> None:
    # An unfinished checkpoint of a one-process run, which 2 processes may not continue.
    res = CliRunner().invoke(main, ["train", "--set", "train.n_tokens=320"])
    assert res.exit_code == 0, res.output
    path = Path("checkpoints") / HOOK / CHECKPOINT_FILE
    assert path.is_file(), sorted(str(p) for p in Path(".").rglob("state.pt"))
    state = torch.load(path, weights_only=False)
    torch.save({**state, "complete": False}, path)
    # Under a plain torchrun, where each process prints its own errors (its agent adds a report of the failed
    # processes, not an error line); under train.processes the launcher shows one (test_a_failing_process_...).
    res = torchrun("-m", "stages", "train", "--set", "train.n_tokens=320", cwd=train_workspace)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr[-3000:]
    assert "written by a run of 1 process, this run has 2; resume with 1 process (" in errors[0]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _start_long_run(tmp: Path) -> tuple[subprocess.Popen, list[int]]:
    """``sae train --set train.processes=2`` with steps enough for minutes; returns once both processes train."""
    err = open(tmp / "stderr.log", "w")  # noqa: SIM115 - the child writes it; read by the caller
    launcher = subprocess.Popen([sys.executable, "-m", "stages", "train", "--set", "train.processes=2", "--set",
                                 "train.n_tokens=6400000", "--set", "train.val_every=0"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=err, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (Path("checkpoints") / HOOK / CHECKPOINT_FILE).exists():  # the first checkpoint: both are training
        assert launcher.poll() is None and time.monotonic() < deadline, (tmp / "stderr.log").read_text()[-3000:]
        time.sleep(0.2)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    return launcher, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killed_launcher_takes_its_processes_with_it(train_workspace: Path, tmp_path: Path) -> None:
    launcher, workers = _start_long_run(tmp_path)
    launcher.kill()  # SIGKILL: the launcher cannot stop them itself
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [w for w in workers if _alive(w)]
    for w in orphans:  # (on failure) not left training
        os.kill(w, signal.SIGKILL)
    assert not orphans, "workers outlived a kill -9 of their launcher"


def test_a_killed_process_is_one_line(train_workspace: Path, tmp_path: Path) -> None:
    # The killed process prints nothing; the other's lost-peer error only echoes it: the launcher names the first.
    launcher, workers = _start_long_run(tmp_path)
    os.kill(workers[1], signal.SIGKILL)
    assert launcher.wait(timeout=60) == 1
    lines = [line for line in (tmp_path / "stderr.log").read_text().splitlines() if " INFO " not in line]
    assert len(lines) == 1 and re.fullmatch(r"error: train: process [01] of 2 was killed by SIGKILL; completed work is "
                                            r"kept, rerun to resume", lines[0]), lines


def test_sigterm_stops_every_process_with_one_line(train_workspace: Path, tmp_path: Path) -> None:
    launcher, workers = _start_long_run(tmp_path)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    assert not any(_alive(w) for w in workers)
    lines = [line for line in (tmp_path / "stderr.log").read_text().splitlines() if " INFO " not in line]
    assert lines == ["error: train: stopped by SIGTERM: the 2 processes were stopped; completed work is kept, rerun "
                     "to resume"]


def test_relaunch_command_line_gives_the_same_options() -> None:
    seen: list[dict] = []

    @click.command()
    @click.option("--params", "params_path", default="params.yaml")
    @click.option("--set", "overrides", multiple=True)
    @click.option("--data", default=None)
    @click.option("--fast/--slow", default=False)
    def cmd(**kw: object) -> None:
        seen.append(kw)
        seen.append({"argv": command_line(click.get_current_context())})

    args = ["--params", "p.yaml", "--set", "train.lr=1e-3", "--set", "sae.k=8", "--fast"]
    assert CliRunner().invoke(cmd, args).exit_code == 0
    argv = seen[1]["argv"]
    assert CliRunner().invoke(cmd, argv).exit_code == 0
    assert seen[2] == seen[0]
    assert argv == ["--params", "p.yaml", "--set", "train.lr=1e-3", "--set", "sae.k=8", "--fast"]


def test_lost_peer_is_one_line() -> None:
    def collective() -> None:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:24988.\nmore")

    with pytest.raises(distributed.PeerLost) as e:
        distributed._collective("all_reduce", collective)
    assert str(e.value) == ("process 0 of 1: all_reduce failed ([gloo/transport/tcp/pair.cc:553] Connection closed by "
                            "peer [127.0.0.1]:24988.); another process of this run stopped first: its error is above")


def test_gradient_sums_start_during_backward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A gloo world of one in this process: the last layer's gradient sum must start before backward has reached
    # the first layer (the overlap), and the sums must equal those taken after backward (sum_gradients_).
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        w1, w2 = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 3))
        events: list[str] = []
        real = dist.all_reduce

        def recorded(t: torch.Tensor, *a: object, **kw: object) -> object:
            events.append("sum w2" if t is w2.grad else "sum w1" if t is w1.grad else "sum ?")
            return real(t, *a, **kw)

        monkeypatch.setattr(dist, "all_reduce", recorded)
        sync = distributed.GradientSync([w1, w2])
        w1.register_post_accumulate_grad_hook(lambda p: events.append("w1 ready"))  # after the sync's own hook
        x = torch.randn(5, 4)

        def backward() -> None:
            ((x @ w1).relu() @ w2).square().sum().backward()

        with sync:  # the first step learns the order backward produces the gradients in: w2, then w1
            backward()
        assert events == ["w1 ready", "sum w1", "sum w2"] and sync.order == [1, 0], events
        events.clear()
        w1.grad = w2.grad = None
        with sync:
            backward()
        assert events == ["sum w2", "sum w1", "w1 ready"], events  # on the old code: ready, then both sums
        overlapped = w1.grad.clone(), w2.grad.clone()
        w1.grad = w2.grad = None
        backward()
        distributed.sum_gradients_([w1, w2])
        assert torch.equal(overlapped[0], w1.grad) and torch.equal(overlapped[1], w2.grad)
        events.clear()
        w1.grad = w2.grad = None
        backward()  # outside the block the hooks do nothing
        assert events == ["w1 ready"]
        sync.close()
    finally:
        dist.destroy_process_group()


def test_two_nodes_rehearsed_on_one_box_train_the_two_process_sae(data: Path, two_processes: Path,
                                                                    tmp_path: Path) -> None:
    # Two torchrun agents, one process each, meeting through a c10d rendezvous on 127.0.0.1, as two machines
    # would (the agent that binds the port hosts the store): the run of 2 processes on one machine, bit for bit.
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "rehearsal", str(WORKER), "--data", str(data), "--out",
           str(tmp_path), "--variants", "topk"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [n.communicate(timeout=300) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for n, (_, err) in zip(nodes, outs, strict=True):
        assert n.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "topk" / "cfg.json").read_text())["training"]["world_size"] == 2
    ref, got = weights(two_processes / "topk"), weights(tmp_path / "topk")
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_distributed_benchmark_tiny_run(tmp_path: Path) -> None:
    # benchmarks/distributed.py at tiny sizes, one launch of 2 processes (loader and overlap), so that it cannot rot.
    out = tmp_path / "dist.json"
    res = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "distributed.py"), "--tiny",
                          "--processes", "2", "--dir", str(tmp_path / "acts"), "--out", str(out)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    shards, rows = report["dataset"]["shards"], report["dataset"]["rows_per_shard"]
    loader = report["loader"]["2"]
    assert [r["rank"] for r in loader] == [0, 1]
    for r in loader:  # each process reads its half: its lanes' shards and rows only
        assert r["rows_decoded"] == shards * rows // 2 and r["shards_hashed"] == shards // 2
        assert r["rows_out"] == shards * rows // 2 and r["seconds"] > 0
    overlap = report["overlap"]
    assert overlap["world"] == 2 and overlap["loss_collectives"] == 3  # the TopK dense step's (test_batch_collectives)
    assert all(overlap[f"{w}_ms"] > 0 for w in ("compute", "sums_only", "after", "overlapped"))
    assert "loader N=2: rank 0:" in res.stdout and "overlap N=2: compute" in res.stdout
