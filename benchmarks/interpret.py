"""Time and peak memory of the non-LM parts of ``interpret`` at the default size, on synthetic data.

Default size: ~236k tokens (1843 contexts of 128), d_model 576, a TopK SAE with d_sae 4608 (8x) and
k 32, 12 topic labels, a 49,152-token unembedding. Everything is random (the numbers measure cost,
not quality); the tokenizer is the tiny offline one from ``pipeline.testing``.

    python benchmarks/interpret.py                      # encode dtype 'auto'
    python benchmarks/interpret.py --dtype float32 --contexts 200
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=1843)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--workdir", type=Path, default=None, help="keep inputs/outputs here (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from transformers import AutoTokenizer

    from pipeline.activations import open_activations, write_activations
    from pipeline.interpret import build_context_table, interpret_hook
    from pipeline.params.analysis import InterpretParams
    from pipeline.sae import SAEConfig, make_sae
    from pipeline.testing import tiny_model

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-interpret-"))
    T, n, d = args.context_length, args.contexts, args.d_model
    rng = np.random.default_rng(0)
    acts = root / "acts"
    if not (acts / "manifest.json").exists():
        write_activations(acts, rng.standard_normal((n * T, d), dtype=np.float32), context_id=np.repeat(np.arange(n), T),
                          position=np.tile(np.arange(T), n), token_id=rng.integers(0, 500, n * T),
                          hook="layers.9.resid_post", dtype="float16")
    if not (root / "model" / "config.json").exists():
        tiny_model(root / "model", "llama")
    tok = AutoTokenizer.from_pretrained(root / "model")
    docs = (np.arange(n * T) // 100).reshape(n, T)  # ~100-token documents, 12 topics
    n_docs = int(docs.max()) + 1
    table = build_context_table(
        pl.DataFrame({"context_id": np.arange(n), "token_ids": rng.integers(0, 500, (n, T)).tolist(),
                      "document_ids": docs.tolist()}),
        pl.DataFrame({"document_id": np.arange(n_docs), "label": [f"topic{i % 12}" for i in range(n_docs)],
                      "title": [f"doc {i}" for i in range(n_docs)]}))
    sae = make_sae(SAEConfig(arch="topk", d_in=d, d_sae=args.d_sae, k=args.k), seed=0)
    norm, W_U = torch.nn.RMSNorm(d), torch.randn(49152, d)

    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    m = interpret_hook(open_activations(acts), sae, table, tok, norm, W_U, InterpretParams(encode_dtype=args.dtype),
                       root / "out", root / "dash")
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    report = {"tokens": m["interpret_tokens"], "d_sae": args.d_sae, "dtype": args.dtype,
              "wall_s": round(time.perf_counter() - t0, 1),
              "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
              "peak_rss_mib": round(c1.ru_maxrss / 1024), "load_avg": open("/proc/loadavg").read().split()[:3]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
