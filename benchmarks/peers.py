"""Our TopK SAE training step next to sae-lens's and sparsify's (eai-sparsify), each library's own, in one process.

Each variant is one training step as that library's trainer runs it — forward, loss, backward, the decoder-norm
handling its trainer does, Adam — on random inputs, for the same size, batch and dtype:

* ``ours`` — ``pipeline.sae`` TopK through the trainer's protocol (``training_loss``, ``before_optimizer_step``,
  gradient clipping at 1.0, Adam, ``after_optimizer_step``, the firing count) with the kernels ``train.kernels:
  auto`` picks (the sparse step on CPU, Triton on CUDA); ``ours_dense`` the same with ``train.kernels: torch``;
* ``sae_lens`` — ``TopKTrainingSAE.training_forward_pass`` (its defaults), backward, clipping at 1.0, Adam, as in
  its ``SAETrainer``;
* ``sparsify`` — ``SparseCoder`` (fvu loss), backward, parallel-gradient removal, Adam, decoder renormalisation, as
  in its ``Trainer`` (on CPU its decoder is the eager ``embedding_bag``; on CUDA its Triton one).

``bf16`` runs each step's forward under ``torch.autocast(bfloat16)`` (fp32 weights and Adam), as the trainers do.
Variants are interleaved: every round times one step of each in turn, so machine noise (other processes) hits
all of them alike; the medians over rounds and their ratios are what to read, with the load average recorded.

The peers live in a separate virtual environment (``benchmarks/.peers-venv``, git-ignored), created on first
use with torch (the version this interpreter runs, so a local CPU wheel serves) and the two packages from PyPI;
the script then reruns itself there with this repository on ``PYTHONPATH``.

    python benchmarks/peers.py --out benchmarks/results/cpu-<machine>-peers.json    # CPU: 2 threads, 2 sizes
    python benchmarks/peers.py --device cuda --out benchmarks/results/<gpu>-peers.json
    python benchmarks/peers.py --tiny --peers none                                   # seconds, no install
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "benchmarks" / ".peers-venv"
PEERS = {"sae_lens": "sae-lens", "sparsify": "eai-sparsify"}  # import name -> PyPI name
SIZES = [(576, 4608, 32), (768, 24576, 32)]  # (d, n_latents, k): the default run's size, and the GPU anchor's
TINY_SIZES = [(32, 256, 8)]
Step = Callable[[torch.Tensor], None]


# ---- the peers' environment --------------------------------------------------------------------------------------


def peers_importable() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in PEERS)


def ensure_venv(install: bool) -> Path:
    """The peers' interpreter, creating the environment first when ``install`` (pip: torch, then the peers)."""
    py = VENV / "bin" / "python"
    probe = f"import {', '.join(PEERS)}"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    if not install:
        print(f"error: {VENV}: no environment with {', '.join(PEERS.values())} (run without --no-install)",
              file=sys.stderr)
        raise SystemExit(2)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    torch_pin = "torch==" + torch.__version__.split("+")[0]  # the same torch as ours; a CPU wheel if one is local
    subprocess.run([py, "-m", "pip", "install", "-q", torch_pin], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *PEERS.values()], check=True)
    return py


# ---- the variants ------------------------------------------------------------------------------------------------


def autocast(dev: torch.device, bf16: bool) -> torch.autocast:
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)


def ours(d: int, n: int, k: int, dev: torch.device, bf16: bool, kernels: str = "auto") -> Step:
    from pipeline.sae import SAEConfig, make_sae
    from pipeline.train_setup import kernel_backend

    sae = make_sae(SAEConfig(arch="topk", d_in=d, d_sae=n, k=k), seed=0).to(dev)
    sae.kernel_backend = kernel_backend(kernels, "topk", dev)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # fused on CPU and CUDA, as pipeline.train_setup

    def step(x: torch.Tensor) -> None:
        with autocast(dev, bf16):
            out = sae.training_loss(x, 100, 1000)  # no dead latents yet: no AuxK work, like the peers here
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.after_optimizer_step()
        out.firing(n)

    return step


def sae_lens(d: int, n: int, k: int, dev: torch.device, bf16: bool) -> Step:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device=str(dev)))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)  # SAETrainer: plain Adam, then clip before its step

    def step(x: torch.Tensor) -> None:
        with autocast(dev, bf16):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                           n_training_steps=100, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def sparsify(d: int, n: int, k: int, dev: torch.device, bf16: bool) -> Step:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=dev, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:
        with autocast(dev, bf16):
            out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step


VARIANTS: dict[str, Callable[..., Step]] = {"sae_lens": sae_lens, "sparsify": sparsify}


# ---- timing ------------------------------------------------------------------------------------------------------


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def compare(makers: dict[str, Callable[[], Step]], x: torch.Tensor, rounds: int, warmup: int) -> dict[str, Any]:
    """Median tokens/s of each variant over ``rounds`` interleaved rounds (one timed step each per round)."""
    steps = {name: make() for name, make in makers.items()}
    for step in steps.values():
        for _ in range(warmup):
            step(x)
    secs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(x.device)
            t0 = time.perf_counter()
            step(x)
            sync(x.device)
            secs[name].append(time.perf_counter() - t0)
    n = x.shape[0]
    return {name: {"tok_s": n / statistics.median(s), "tok_s_rounds": [n / v for v in s]} for name, s in secs.items()}


def machine(dev: torch.device) -> dict[str, Any]:
    """CPU model (lscpu), flags that pick the kernels, threads, load average; the GPU's name on CUDA."""
    info: dict[str, Any] = {"device": dev.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version(), "load_average": list(os.getloadavg()),
                            # as set (or not) by the caller; `sae` caps oneDNN's ISA, this script does not
                            "env": {v: os.environ.get(v) for v in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["cpus"] = fields.get("CPU(s)", "").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, subprocess.CalledProcessError):
        info["cpu_model"] = platform.processor()
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    for mod, dist in PEERS.items():
        if importlib.util.find_spec(mod) is not None:
            info[dist] = importlib.metadata.version(dist)
    return info


def run(a: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(a.device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    try:
        return measure(a, dev)
    finally:
        torch.set_num_threads(threads)


def measure(a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    sizes = [tuple(int(v) for v in s.split(",")) for s in a.size] if a.size else (TINY_SIZES if a.tiny else SIZES)
    peers = [] if a.peers == "none" else [p for p in a.peers.split(",") if p]
    report: dict[str, Any] = {"machine": machine(dev), "batch": a.batch, "rounds": a.rounds, "warmup": a.warmup,
                              "results": []}
    for d, n, k in sizes:
        for dtype in a.dtypes.split(","):
            bf16 = dtype == "bf16"
            torch.manual_seed(0)
            x = torch.randn(a.batch, d, device=dev)
            args = (d, n, k, dev, bf16)
            makers: dict[str, Callable[[], Step]] = {"ours": partial(ours, *args)}
            if not a.no_dense:
                makers["ours_dense"] = partial(ours, *args, kernels="torch")
            for p in peers:
                makers[p] = partial(VARIANTS[p], *args)
            row: dict[str, Any] = {"d": d, "n_latents": n, "k": k, "dtype": dtype,
                                   "variants": compare(makers, x, a.rounds, a.warmup)}
            tok = {name: v["tok_s"] for name, v in row["variants"].items()}
            if peers:
                best = max(peers, key=lambda p: tok[p])
                row["best_peer"], row["ratio_ours_to_best_peer"] = best, tok["ours"] / tok[best]
            report["results"].append(row)
            print(f"d={d} n={n} k={k} {dtype}: " + "  ".join(f"{m} {v:,.0f}" for m, v in tok.items())
                  + (f"  ours/best peer ({row['best_peer']}) {row['ratio_ours_to_best_peer']:.2f}x" if peers else ""),
                  flush=True)
    report["machine"]["load_average_after"] = list(os.getloadavg())
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--size", action="append", metavar="D,N,K", help="d,n_latents,k (repeatable; default two sizes)")
    p.add_argument("--tiny", action="store_true", help="one tiny size (smoke run)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first")
    p.add_argument("--peers", default="sae_lens,sparsify", help="comma list of sae_lens, sparsify, or 'none'")
    p.add_argument("--no-dense", action="store_true", help="skip our dense step (ours_dense)")
    p.add_argument("--no-install", action="store_true", help="never create the peers' environment")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/<device>-<date>-"
                   "peers.json; '-' for none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.peers != "none" and not peers_importable():  # rerun in the peers' environment, this repo importable
        py = ensure_venv(not a.no_install)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        raise SystemExit(subprocess.run([py, __file__, *argv], env=env).returncode)
    sys.path.insert(0, str(REPO))
    from pipeline.io import atomic_write_json

    report = run(a)
    out = a.out or REPO / "benchmarks" / "results" / f"{torch.device(a.device).type}-{date.today()}-peers.json"
    if str(out) != "-":
        atomic_write_json(Path(out), report)
        print(f"# wrote {out}")
    return report


if __name__ == "__main__":
    main()
