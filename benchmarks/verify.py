"""Cost of checking every shard's sha256 while streaming: verified vs plain reads, same process.

    python benchmarks/verify.py --gb 1 --dir /tmp/acts-1gb     # generate (once), then measure
    python benchmarks/verify.py --tiny                          # CI smoke run (seconds)

The reader verifies a shard the first time a dataset object reads it: the whole file is read once,
hashed, and decoded from memory. A second pass on the same object finds every shard verified and
unchanged, so it reads only row groups from the files, exactly as the reader did before the check
existed: that pass is the "plain" baseline. Both passes run with the page cache warm (every shard is
read once before timing), alternately, ``--repeats`` times; medians are reported. Also: hashlib's
sha256 rate on one core, the ceiling of the check.

Reported per mode (``sequential``: ``iter_arrays``, what evaluate / interpret / steer read;
``shuffled``: ``iter_batches(shuffle=True)``, what the trainer reads; ``train_batches``: the trainer's
prefetching loader): ``verified_gb_s``, ``plain_gb_s`` (dataset bytes / seconds) and ``overhead``
(verified seconds / plain seconds - 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np


def generate(root: Path, gb: float, d_model: int, shard_rows: int) -> None:
    from pipeline.activations import ActivationWriter

    if (root / "manifest.json").is_file():
        return
    n = int(gb * 1e9 / (2 * d_model))
    rng = np.random.default_rng(0)
    w = ActivationWriter(root, hook="bench", d_model=d_model, dtype="float16")
    for i, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        ids = np.arange(start, start + rows)
        w.write_shard(i, ids, np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                      rng.standard_normal((rows, d_model), dtype=np.float32).astype(np.float16))
    w.finalize()


def sha256_gb_s(mb: int = 256) -> float:
    data = np.random.default_rng(1).bytes(mb << 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - t0) / 1e9


def _time(drain: Callable[[], Iterable[Any]]) -> float:
    t0 = time.perf_counter()
    for _ in drain():
        pass
    return time.perf_counter() - t0


def measure(root: Path, repeats: int, batch: int) -> dict[str, Any]:
    import torch

    from pipeline.activations import open_activations
    from pipeline.loader import train_batches

    probe = open_activations(root)
    nbytes = sum((root / s.file).stat().st_size for s in probe.manifest.shards)
    for s in probe.manifest.shards:  # warm the page cache: both passes then read from memory
        (root / s.file).read_bytes()
    steps = probe.n_tokens // batch
    modes: dict[str, Callable[[Any], Iterable[Any]]] = {
        "sequential": lambda ds: ds.iter_arrays(),
        "shuffled": lambda ds: ds.iter_batches(batch, shuffle=True, seed=0, drop_last=True),
        "train_batches": lambda ds: train_batches(ds, batch, seed=0, start_step=0, total_steps=steps,
                                                  device=torch.device("cpu"), prefetch=4),
    }
    out: dict[str, Any] = {"dataset_gb": nbytes / 1e9, "shards": len(probe.manifest.shards),
                           "sha256_gb_s": sha256_gb_s()}
    for name, stream in modes.items():
        verified, plain = [], []
        for _ in range(repeats):
            ds = open_activations(root)  # fresh object: nothing verified yet
            verified.append(_time(lambda: stream(ds)))  # noqa: B023 - called before ds changes
            plain.append(_time(lambda: stream(ds)))  # noqa: B023 - same object: all shards verified
        v, p = statistics.median(verified), statistics.median(plain)
        out[name] = {"verified_gb_s": nbytes / v / 1e9, "plain_gb_s": nbytes / p / 1e9, "overhead": v / p - 1}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="dataset size to generate (float16, d_model 576)")
    p.add_argument("--dir", type=Path, default=None, help="dataset folder (kept; default: a temporary one)")
    p.add_argument("--tiny", action="store_true", help="8 MB dataset, 1 repeat (CI smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (atomically)")
    a = p.parse_args(argv)
    gb, shard_rows, repeats = (0.008, 2048, 1) if a.tiny else (a.gb, 65536, a.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.dir or Path(tmp) / "acts"
        generate(root, gb, 576, shard_rows)
        result = measure(root, repeats, min(a.batch, 512) if a.tiny else a.batch)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out is not None:
        from pipeline.io import atomic_write_text

        atomic_write_text(a.out, text + "\n")
    return result


if __name__ == "__main__":
    main()
