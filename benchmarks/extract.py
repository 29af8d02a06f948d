"""Extraction throughput against a bare forward pass of the same model to the same hook, same process.

    python benchmarks/extract.py                       # packaged SmolLM2-135M, layers.9.resid_post, CPU
    python benchmarks/extract.py --tiny                # tiny random Llama: seconds, what CI runs
    python benchmarks/extract.py --model gpt2 --hook layers.7.resid_post --device cuda --dtype bfloat16

Prints tokens/s for (a) the bare forward to the deepest hook (``run_to_hooks``, activations
discarded) and (b) the full extraction path (forward + device->host copy + Parquet shards +
fsync + sha256, writers overlapped on background threads), and their ratio. Target: >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.extract import ExtractSpec, extract_split
from pipeline.hooks import run_to_hooks
from pipeline.models import load_model


def bare_forward(model: torch.nn.Module, tokens: np.ndarray, hooks: list[str], batch_size: int) -> float:
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for b in range(0, len(tokens), batch_size):
        ids = torch.from_numpy(tokens[b: b + batch_size].astype(np.int64)).to(device)
        with torch.inference_mode():
            out = run_to_hooks(model, ids, hooks)
        for v in out.values():  # the bare pass still waits for the device, as extraction must
            v.float().sum().item()
    return tokens.size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", action="append", help="repeatable; default layers.9.resid_post")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--contexts", type=int, default=256)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--contexts-per-shard", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating bare/extract rounds; best of each")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama (CI smoke run)")
    ap.add_argument("--out", type=Path, help="write results as JSON")
    args = ap.parse_args()
    hooks = args.hook or (["layers.1.resid_post"] if args.tiny else ["layers.9.resid_post"])
    if args.tiny:
        from pipeline.testing import tiny_model

        args.model = str(tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama"))
        args.contexts, args.context_length, args.batch_size, args.contexts_per_shard = 64, 32, 8, 16
        args.dtype = "float32"
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm.model.config.vocab_size, size=(args.contexts, args.context_length), dtype=np.int64)
    spec = ExtractSpec(hooks=hooks, batch_size=args.batch_size, contexts_per_shard=args.contexts_per_shard, dtype="float16")
    bare_forward(lm.model, tokens[: args.batch_size], hooks, args.batch_size)  # warm-up
    bare, extract = [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(lm.model, tokens, hooks, args.batch_size))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            extract_split(lm.model, tokens, np.arange(len(tokens)), Path(tmp), "train", spec, {"model_id": lm.model_id})
            extract.append(tokens.size / (time.perf_counter() - t0))
    res = {
        "model": lm.model_id, "hooks": hooks, "device": args.device, "dtype": args.dtype,
        "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads",
        "tokens": int(tokens.size), "batch_size": args.batch_size,
        "bare_forward_tok_s": round(max(bare)), "extract_tok_s": round(max(extract)),
        "ratio": round(max(extract) / max(bare), 3),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
