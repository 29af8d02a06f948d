"""Data-parallel training on CPU with gloo: what each process's loader reads, and gradient sums during backward.

    python benchmarks/distributed.py --out /tmp/dist.json        # loader at N = 1, 2, 4; overlap at N = 2 (minutes)
    python benchmarks/distributed.py --tiny                       # smoke run (seconds)

``loader``: N processes (torchrun, 127.0.0.1) each drain one epoch of the training stream (``train_batches``,
its rows of every batch, prefetch thread on) of a float16 dataset of many shards, from a warm page cache; per
process: rows decoded, shards hashed, seconds, and tokens/s of the *whole* batch stream it helps deliver
(``N × its rows / s``). With each process reading its lanes only, rows decoded and seconds fall as 1/N.

``overlap``: 2 processes, one TopK training step (forward, loss with its global batch statistics, backward,
gradient sums) timed four ways, interleaved, medians: ``compute`` (no gradient sums), ``sums_only`` (the sums of
those gradients alone), ``after`` (sums after backward, the old way) and ``overlapped`` (``GradientSync``: each
sum starts as backward produces its gradient). Overlap shows as ``overlapped < after ≈ compute + sums_only``.

Times on a shared 2-core box move with the load: compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(root: Path, shards: int, rows: int, d_model: int) -> None:
    from pipeline.activations import ActivationWriter

    if (root / "manifest.json").is_file():
        return
    rng = np.random.default_rng(0)
    w = ActivationWriter(root, hook="bench", d_model=d_model, dtype="float16")
    for i in range(shards):
        ids = np.arange(i * rows, (i + 1) * rows)
        w.write_shard(i, ids, np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                      rng.standard_normal((rows, d_model), dtype=np.float32).astype(np.float16))
    w.finalize()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, jobs: dict[str, dict]) -> list[dict[str, dict]]:
    """This script's workers in one launch of ``n`` processes, each job (``loader``, ``overlap``: its keyword
    arguments) in turn; per rank, each job's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(_port()), __file__, "--worker", json.dumps(jobs), "--result", tmp]
        threads = str(max(1, (os.cpu_count() or 1) // n))
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": threads}, stdout=subprocess.DEVNULL)
        return [json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(n)]


def worker_loader(data: Path, batch: int) -> dict:
    import torch

    from pipeline import distributed
    from pipeline.activations import open_activations
    from pipeline.loader import LoaderWork, batches_per_epoch, train_batches

    ranks, _ = distributed.start("cpu", "device")
    ds = open_activations(data)
    steps = batches_per_epoch(ds, batch)
    work = LoaderWork()
    distributed.barrier()
    t0 = time.perf_counter()
    rows = sum(x.shape[0] for x in train_batches(ds, batch, 0, 0, steps, torch.device("cpu"), 2,
                                                    (ranks.rank, ranks.world), work=work))
    seconds = time.perf_counter() - t0
    return {"rank": ranks.rank, "world": ranks.world, "rows_out": rows, "rows_decoded": work.rows_decoded,
            "shards_hashed": work.shards_hashed, "seconds": round(seconds, 3),
            "stream_tok_s": round(rows * ranks.world / seconds)}


def worker_overlap(d_model: int, d_sae: int, k: int, batch: int, steps: int) -> dict:
    import torch

    from pipeline import distributed
    from pipeline.sae import SAEConfig, make_sae
    from pipeline.sae import batch as sae_batch

    ranks, _ = distributed.start("cpu", "device")
    sae = make_sae(SAEConfig(d_in=d_model, d_sae=d_sae, k=k, arch="topk", hook="bench"), seed=0)
    x = torch.randn(batch // ranks.world, d_model, generator=torch.Generator().manual_seed(ranks.rank))
    sync = distributed.GradientSync(sae.parameters())
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def backward() -> None:
        with sae_batch.across(ranks.world, distributed):
            out = sae.training_loss(x, 100, 1000, dead)
        sae.zero_grad(set_to_none=True)
        out.loss.backward()

    def compute() -> None:
        backward()

    def sums_only() -> None:  # the gradients of the last step, summed again: the communication alone
        distributed.sum_gradients_(sae.parameters())

    def after() -> None:
        backward()
        distributed.sum_gradients_(sae.parameters())

    class Counted:  # pipeline.distributed's collectives, counted: the loss's blocking ones per step
        calls = 0

        def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
            Counted.calls += 1
            return distributed.all_reduce_(t, op)

        def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
            Counted.calls += 1
            return distributed.all_gather_rows(t)

        def all_reduce_later(self, t: torch.Tensor) -> object:
            Counted.calls += 1
            return distributed.all_reduce_later(t)

    def overlapped() -> None:
        Counted.calls = 0
        with sae_batch.across(ranks.world, Counted()):
            out = sae.training_loss(x, 100, 1000, dead)
        sae.zero_grad(set_to_none=True)
        with sync:
            out.loss.backward()

    ways = {"compute": compute, "sums_only": sums_only, "after": after, "overlapped": overlapped}
    times: dict[str, list[float]] = {w: [] for w in ways}
    compute()
    overlapped()  # the first block records the order backward produces the gradients in
    for _ in range(steps):  # interleaved rounds: the box's load moves all four alike
        for name, fn in ways.items():
            distributed.barrier()
            t0 = time.perf_counter()
            fn()
            distributed.barrier()
            times[name].append(time.perf_counter() - t0)
    grad_mb = sum(p.numel() for p in sae.parameters()) * 4 / 1e6
    return {"rank": ranks.rank, "world": ranks.world, "grad_mb": round(grad_mb, 1), "loss_collectives": Counted.calls,
            **{f"{w}_ms": round(statistics.median(t) * 1e3, 1) for w, t in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dir", type=Path, default=None, help="dataset directory (generated once)")
    ap.add_argument("--worker", default=None, help="(internal) the jobs of one launched process, as JSON")
    ap.add_argument("--result", type=Path)
    ap.add_argument("--only", choices=["loader", "overlap"], default=None)
    ap.add_argument("--processes", default="1,2,4", help="process counts for the loader (overlap: at 2)")
    a = ap.parse_args()
    if a.worker:
        res = {job: worker_loader(Path(kw["data"]), kw["batch"]) if job == "loader" else worker_overlap(**kw)
               for job, kw in json.loads(a.worker).items()}
        (a.result / f"{next(iter(res.values()))['rank']}.json").write_text(json.dumps(res))
        return
    shards, rows, d = (8, 2048, 64) if a.tiny else (32, 8192, 512)
    data = a.dir or Path(tempfile.mkdtemp()) / "acts"
    generate(data, shards, rows, d)
    for p in sorted(data.glob("*.parquet")):  # a warm page cache for every N
        p.read_bytes()
    # 512 -> 8,192: 34 MB of gradients per step against ~0.1 s of compute per process at 64 rows each, so that
    # on gloo over loopback the sums are a visible share of the step (larger batches hide them in any case).
    shape = (dict(d_model=64, d_sae=512, k=8, batch=256, steps=3) if a.tiny
             else dict(d_model=512, d_sae=8192, k=32, batch=128, steps=15))
    loader, overlap = {}, {}
    counts = [int(n) for n in a.processes.split(",")]
    for n in sorted(set(counts) | ({2} if a.only != "loader" else set())):
        jobs = {"loader": {"data": str(data), "batch": 1024 if a.tiny else 4096}} if n in counts and a.only != "overlap" else {}
        if n == 2 and a.only != "loader":
            jobs["overlap"] = shape  # in the same launch: one process start-up fewer
        if not jobs:
            continue
        ranks = launch(n, jobs)
        if "loader" in jobs:
            loader[n] = [r["loader"] for r in ranks]
            print(f"loader N={n}: " + "; ".join(f"rank {r['rank']}: {r['rows_decoded']} rows decoded, "
                                                f"{r['shards_hashed']} shards hashed, {r['seconds']} s" for r in loader[n]))
        if "overlap" in jobs:
            overlap = ranks[0]["overlap"]
    print("overlap N=2: " + ", ".join(f"{k} {v}" for k, v in overlap.items() if k.endswith("_ms")))
    result = {"dataset": {"shards": shards, "rows_per_shard": rows, "d_model": d, "dtype": "float16"},
              "loader": {str(n): r for n, r in loader.items()}, "overlap": {**shape, **overlap},
              "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
