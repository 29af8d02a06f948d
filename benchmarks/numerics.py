"""The cost of MKL's reproducible mode (``MKL_CBWR=AUTO,STRICT``, set by the ``sae`` command).

    python benchmarks/numerics.py              # SmolLM2-135M-shaped random Llama + the default SAE's GEMM
    python benchmarks/numerics.py --tiny       # seconds (CI smoke run)

Each mode runs in its own fresh process (MKL reads the mode once, at its first call) on the same
inputs, alternating modes ``--repeats`` times; prints the median seconds per call of each workload
in each mode and the ratio strict / default. Workloads: the float32 encoder GEMM of the default SAE
([batch, d_model] @ [d_model, d_sae]) and a float32 forward of a SmolLM2-shaped model to layer 9
(SDPA attention; bf16 runs go through oneDNN, which the mode does not touch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from pipeline.numerics import mkl_cbwr_mode

a = json.loads(sys.argv[1])
torch.manual_seed(0)
x, w = torch.randn(a["batch"], a["d"]), torch.randn(a["d"], a["d_sae"])
cfg = LlamaConfig(hidden_size=a["d"], intermediate_size=a["ffn"], num_attention_heads=a["heads"],
                  num_key_value_heads=a["kv_heads"], num_hidden_layers=a["layers"], vocab_size=a["vocab"])
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, a["vocab"], (a["contexts"], a["ctx"]))

def timed(fn, n):
    fn()  # warm-up (first MKL call, allocator)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n

with torch.inference_mode():
    gemm = timed(lambda: x @ w, a["n"])
    fwd = timed(lambda: model.model(input_ids=ids), max(1, a["n"] // 4))
print(json.dumps({"mode": mkl_cbwr_mode(), "gemm_s": gemm, "forward_s": fwd}))
"""

FULL = {"batch": 1024, "d": 576, "d_sae": 4608, "ffn": 1536, "heads": 9, "kv_heads": 3, "layers": 10,
        "vocab": 49152, "contexts": 8, "ctx": 128, "n": 20}
TINY = {"batch": 64, "d": 32, "d_sae": 128, "ffn": 64, "heads": 4, "kv_heads": 2, "layers": 2,
        "vocab": 128, "contexts": 4, "ctx": 16, "n": 4}


def run_mode(strict: bool, sizes: dict[str, int]) -> dict[str, float | str | None]:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if strict:
        env["MKL_CBWR"] = "AUTO,STRICT"
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(sizes)], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write results as JSON")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    runs: dict[str, list[dict]] = {"default": [], "strict": []}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both modes alike
        runs["default"].append(run_mode(False, sizes))
        runs["strict"].append(run_mode(True, sizes))
    report: dict = {"sizes": sizes, "repeats": args.repeats,
                    "modes": {m: r[0]["mode"] for m, r in runs.items()}}
    for w in ("gemm_s", "forward_s"):
        med = {m: statistics.median(r[w] for r in runs[m]) for m in runs}
        report[w] = {**med, "strict_over_default": med["strict"] / med["default"]}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
