"""Peak host memory of SAE training on a large activation dataset: streaming, never all in RAM.

    python benchmarks/train_memory.py --gb 1 --dir /tmp/acts-1gb        # generate (once), then train
    python benchmarks/train_memory.py --gb 20 --dir /big/disk/acts-20gb  # the 20 GB requirement

Generates a synthetic dataset of the given size (d_model 576, float16, like SmolLM2-135M layer 9)
with the public activation API, then trains one pass in a *fresh* subprocess so the reported peak
RSS (``ru_maxrss``) is the trainer's alone, and prints it next to the dataset size: the ratio
peak RSS / dataset bytes is what should stay far below 1 (target: < 4 GB for 20 GB of data).

Measured on the 2-core dev box (2026-11-27/28, CPU, batch 4096, d_sae 576, one pass, prefetch 4):
0.25 GB dataset -> 1.35 GB peak RSS; 1.01 GB -> 1.53 GB; 20.2 GB (17.4M tokens) -> 1.54 GB. The reader alone (no SAE) peaked at
0.77 / 0.86 GB, and at 0.82 GB after five passes over the 0.25 GB set: bounded by the shuffle
buffer, the prefetch queue and allocator caching, not by the dataset size.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path


def generate(root: Path, gb: float, d_model: int) -> None:
    from pipeline.synthetic import write_synthetic_activations

    if (root / "manifest.json").is_file():
        return
    n_tokens = int(gb * 1e9 / (2 * d_model))
    t0 = time.perf_counter()
    write_synthetic_activations(root, n_tokens, d_model, n_features=4 * d_model, k_true=16, seed=0,
                                hook="layers.9.resid_post", dtype="float16", shard_rows=131072, scale=10.0)
    print(f"generated {n_tokens} tokens ({gb:.2f} GB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def train(root: Path, expansion: int, batch_size: int, max_tokens: int | None) -> dict[str, float]:
    from pipeline.activations import open_activations
    from pipeline.params.sae import TrainParams
    from pipeline.sae import SAEConfig
    from pipeline.train import train_sae

    ds = open_activations(root)
    cfg = SAEConfig(arch="topk", d_in=ds.d_model, d_sae=expansion * ds.d_model, k=32, hook=ds.hook)
    params = TrainParams(batch_size=batch_size, n_tokens=max_tokens, log_every=50, val_every=0, checkpoint_every=0)
    out = root.parent / (root.name + "-sae")
    t0 = time.perf_counter()
    result = train_sae(ds, cfg, params, out, out / "checkpoints", seed=0)
    summary = result.summary
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    bytes_data = sum((root / s.file).stat().st_size for s in ds.manifest.shards)
    return {"dataset_gb": bytes_data / 1e9, "tokens_trained": summary["tokens"], "peak_rss_gb": peak_kb * 1024 / 1e9,
            "rss_over_data": peak_kb * 1024 / bytes_data, "seconds": time.perf_counter() - t0,
            "tokens_per_s": result.tokens_per_s, "final_fvu_batch": summary.get("fvu_batch@1", float("nan"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="dataset size to generate (GB of float16 activations)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sae-train-memory"), help="where the dataset goes")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=1, help="d_sae / d_model (small: memory, not compute, is measured)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=None, help="train on at most this many tokens (default: one pass)")
    ap.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.dir / f"acts-{args.gb:g}gb"
    if args.train_only:
        print(json.dumps(train(root, args.expansion, args.batch_size, args.max_tokens)))
        return
    generate(root, args.gb, args.d_model)
    cmd = [sys.executable, __file__, "--train-only", "--gb", str(args.gb), "--dir", str(args.dir),
           "--expansion", str(args.expansion), "--batch-size", str(args.batch_size)]
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=2))
    print(f"peak RSS {res['peak_rss_gb']:.2f} GB for a {res['dataset_gb']:.2f} GB dataset "
          f"(ratio {res['rss_over_data']:.3f}; streaming keeps it ~constant in the dataset size)")


if __name__ == "__main__":
    main()
