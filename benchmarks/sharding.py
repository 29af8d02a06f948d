"""Memory and step time of latent-sharded training (``train.parallel: latents``) against one process, on CPU.

    python benchmarks/sharding.py --processes 1 2 --d-in 512 --d-sae 65536 --batch 256 --steps 6

For each N it starts N processes (``torch.distributed.run``, gloo on 127.0.0.1, one thread each) that train a
TopK SAE on a synthetic dataset, and prints per process: the resident memory the training added (RSS sampled
after every step, minus the RSS before the run was set up: the SAE's weights, gradients and Adam moments, the
step's activations and allocator caching) next to the memory model's ``32·d·m / N + 4·B·(d + 3·m/N)`` bytes
(README "Memory per GPU"), and the median step time after the first. The processes share this machine's
cores, so on a CPU the N-process step time shows the collectives' cost, not a speed-up.
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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    """One process: train, sample RSS and the time of every step, write them to ``--out/rank<r>.json``."""
    from pipeline.activations import open_activations
    from pipeline.params.sae import TrainParams
    from pipeline.sae import SAEConfig
    from pipeline.train import train_sae
    from pipeline.train_loop import TrainRun

    ds = open_activations(args.data)
    real = TrainRun.train_step
    samples: list[tuple[float, int]] = []

    def timed(self: TrainRun, x: object) -> None:
        t = time.perf_counter()
        real(self, x)  # type: ignore[arg-type]
        samples.append((time.perf_counter() - t, rss_bytes()))

    TrainRun.train_step = timed  # type: ignore[method-assign]
    base = rss_bytes()
    cfg = SAEConfig(arch="topk", d_in=ds.d_model, d_sae=args.d_sae, k=32, hook="bench")
    params = TrainParams(device="cpu", dtype="float32", kernels="torch", batch_size=args.batch,
                         n_tokens=args.batch * args.steps, log_every=args.steps, val_every=0, checkpoint_every=0,
                         prefetch=0, parallel="latents")
    out = Path(args.out)
    train_sae(ds, cfg, params, out / "sae", out / "ckpt", seed=0)
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "added_rss": max(r for _, r in samples) - base,
        "step_s": statistics.median(t for t, _ in samples[1:]) if len(samples) > 1 else samples[0][0]}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    from pipeline.synthetic import write_synthetic_activations

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "acts"
        write_synthetic_activations(data, n_tokens=args.batch * args.steps, d_model=args.d_in,
                                    n_features=4 * args.d_in, k_true=16, seed=0, dtype="float32")
        d, m, B = args.d_in, args.d_sae, args.batch
        for n in args.processes:
            out = Path(tmp) / f"n{n}"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
                            "127.0.0.1", "--master-port", str(port), __file__, "--worker", "--data", str(data), "--out",
                            str(out), "--d-sae", str(m), "--batch", str(B), "--steps", str(args.steps)],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            model = 32 * d * m / n + 4 * B * (d + 3 * m / n)
            for r in range(n):
                got = json.loads((out / f"rank{r}.json").read_text())
                print(f"N={n} rank {r}: d {d} x m {m}, B {B}: added RSS {got['added_rss'] / 1e6:.0f} MB, model "
                      f"{model / 1e6:.0f} MB; step {got['step_s'] * 1e3:.0f} ms (median of {args.steps - 1})")


if __name__ == "__main__":
    main()
