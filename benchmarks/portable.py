"""Cost of ``numerics.portable``: the pipeline's two heavy kernels in the default numerics and
in the portable ones, each mode in a fresh process (MKL and ATen read their settings at start-up).

    python benchmarks/portable.py                 # SmolLM2-135M forward to layers.9 + default-size SAE step
    python benchmarks/portable.py --tiny          # CI smoke run (seconds): tiny random model, tiny SAE

Modes, run alternately ``--repeats`` times (medians reported):

- ``default``: what ``sae`` does on this machine: MKL ``AUTO,STRICT``, torch's threads (one per core),
  ``model.dtype: bfloat16`` and ``train.dtype: auto`` (bf16 autocast where the CPU has AMX/AVX512-BF16);
- ``fp32``: the same numerics but float32 everywhere (the dtype's share of the cost);
- ``portable``: ``numerics.portable: true``: float32, MKL ``COMPATIBLE,STRICT``, ATen's baseline kernels,
  1 thread, deterministic algorithms.

Per mode: ``forward_s`` (one no-grad forward of a 16x128 batch to ``layers.9.resid_post``: extract's
unit of work; the tiny model: 4x32 to layer 1) and ``train_step_s`` (one TopK SAE step at the default
size, d_model 576 / d_sae 4608 / k 32 / 1024 tokens: forward, loss, backward, Adam; tiny: 32/128/4/64).

``--isa-check`` also runs ``default`` and ``portable`` once more as if on an older x86 CPU (every
library capped at AVX2 through its own switch, 1 thread) and reports whether the forward's
activations and the trained SAE weights keep their bits (``same_bits``): the portable path's promise,
checked as far as one machine can.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("default", "fp32", "portable")
# "Another CPU" on this one: MKL, ATen, oneDNN and NumPy each capped at AVX2 by their own switch; 1 thread.
OLDER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR",
             "OMP_NUM_THREADS": "1"}
REPO_ROOT = Path(__file__).resolve().parents[1]


def worker(mode: str, tiny: bool, steps: int) -> dict[str, float | str]:
    """One process, one mode: time a forward and ``steps`` SAE training steps (after one warm-up each)."""
    import hashlib

    import torch

    from pipeline.environment import cpu_has_fast_bf16, environment
    from pipeline.hooks import run_to_hooks
    from pipeline.models import load_model
    from pipeline.numerics import apply_numerics
    from pipeline.sae import SAEConfig, make_sae

    apply_numerics(mode == "portable", None)
    fast = mode == "default"
    if tiny:
        from pipeline.testing import tiny_model

        name, (B, T), hook, (d, n, k, batch) = str(tiny_model(Path(tempfile.mkdtemp()) / "m")), (4, 32), \
            "layers.1.resid_post", (32, 128, 4, 64)
    else:
        name, (B, T), hook, (d, n, k, batch) = "smollm2-135m", (16, 128), "layers.9.resid_post", (576, 4608, 32, 1024)
    lm = load_model(name, dtype="bfloat16" if fast else "float32")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.model.config.vocab_size, (B, T), generator=g)
    forward = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.no_grad():
            acts = run_to_hooks(lm.model, ids, [hook])[hook]  # [B, T, d_model]
        forward.append(time.perf_counter() - t)
    digest = hashlib.sha256(acts.float().numpy().tobytes())

    sae = make_sae(SAEConfig(arch="topk", d_in=d, d_sae=n, k=k), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(batch, d, generator=g)
    bf16 = fast and cpu_has_fast_bf16()  # train.dtype auto
    step_s = []
    for step in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = sae.training_loss(x, step, steps + 1)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t)
    for tensor in sae.state_dict().values():
        digest.update(tensor.detach().float().numpy().tobytes())
    env = environment()
    return {"forward_s": forward[-1], "train_step_s": statistics.median(step_s[1:]), "digest": digest.hexdigest(),
            "mkl_cbwr": env["mkl_cbwr"],
            "cpu_capability": env["cpu_capability"], "threads": env["threads"], "bf16_autocast": str(bf16)}


def mode_env(mode: str, older_cpu: bool = False) -> dict[str, str]:
    from pipeline.numerics import MKL_CBWR, PORTABLE_ENV

    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV and k not in OLDER_CPU}
    env.update(OLDER_CPU if older_cpu else {})
    env.update(PORTABLE_ENV if mode == "portable" else {"MKL_CBWR": MKL_CBWR})  # as the `sae` command sets them
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--isa-check", action="store_true")
    ap.add_argument("--worker", choices=MODES)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.tiny, a.steps)))
        return {}
    def run(mode: str, older_cpu: bool = False) -> dict:
        cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(a.steps)] + (["--tiny"] if a.tiny else [])
        res = subprocess.run(cmd, env=mode_env(mode, older_cpu), capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(a.repeats):
        for mode in MODES:
            runs[mode].append(run(mode))
    report: dict = {"load_avg": os.getloadavg()[0], "modes": {}}
    for mode, rs in runs.items():
        report["modes"][mode] = {**{k: statistics.median(r[k] for r in rs) for k in ("forward_s", "train_step_s")},
                                 **{k: rs[0][k] for k in ("mkl_cbwr", "cpu_capability", "threads", "bf16_autocast")}}
    base = report["modes"]["default"]
    for mode in ("fp32", "portable"):
        m = report["modes"][mode]
        m["forward_x"] = round(m["forward_s"] / base["forward_s"], 2)
        m["train_step_x"] = round(m["train_step_s"] / base["train_step_s"], 2)
    if a.isa_check:
        report["isa_check"] = {}
        for mode in ("default", "portable"):
            older = run(mode, older_cpu=True)
            report["isa_check"][mode] = {"same_bits": older["digest"] == runs[mode][0]["digest"],
                                         "older_cpu": {k: older[k] for k in ("mkl_cbwr", "cpu_capability", "threads")}}
    print(json.dumps(report, indent=2))
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
