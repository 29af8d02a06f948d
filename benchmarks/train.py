"""Throughput of one SAE training step (forward, loss, backward, Adam) in tokens/s, with the card's roofline.

Measured in one process on one device, on random inputs (like the anchors in benchmarks/README.md):

* ``reference`` — a plain PyTorch TopK SAE: dense encoder, ``topk``, scatter into a dense ``[N, d_sae]`` code,
  dense decoder matmul (``pipeline.kernels`` ``backend="torch"``), MSE, Adam;
* ``kernels`` — the same step through ``pipeline.kernels.topk_sae_forward`` (Triton sparse decoder and sparse
  encoder backward on CUDA; on CPU ``auto`` falls back to the torch path, so the two match there);
  ``kernels_fused`` (CUDA only) also selects the top k inside the encoder matmul kernel;
* ``sae:<arch>`` — each architecture of ``pipeline.sae`` through the trainer's step protocol
  (``training_loss`` under bf16 autocast, ``before_optimizer_step``, Adam, ``after_optimizer_step``), with the
  kernel backend ``train.kernels: auto`` picks (Triton for topk/batchtopk on CUDA): the step ``sae train`` runs,
  AuxK and the unit-norm decoder constraint included.

All variants use fp32 master weights, bf16 compute on CUDA (fp32 on CPU) and the same Adam (fused on CUDA).
Also measured: the card's bf16 matmul rate and copy bandwidth (to compute a roofline floor for the step, model in
benchmarks/README.md) and the activation loader's delivery rate next to the trainer's consumption.

    python benchmarks/train.py --device cpu --tiny --out /tmp/train.json      # seconds, what CI runs
    python benchmarks/train.py --out results/train_h100.json                  # GPU defaults (README.md)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.io import atomic_write_json
from pipeline.kernels import make_adam, maybe_compile, resolve_backend, topk_sae_forward
from pipeline.kernels.dispatch import Backend

GPU_SIZES = [(768, 24576, 32), (2304, 65536, 64)]  # (d, n_latents, k) of the anchors in benchmarks/README.md
GPU_BATCHES = [4096, 16384]
TINY_SIZES = [(32, 256, 8)]
TINY_BATCHES = [128]
ADAM_BYTES_PER_PARAM = 34  # read p, g, m, v (16) + write p, m, v (12) + backward writes g (4) + bf16 read (2)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls (device synchronised only around the timed loop)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / steps


# ---- roofline ----------------------------------------------------------------------------------------------


def measure_card(dev: torch.device, tiny: bool) -> dict[str, Any]:
    """Matmul rate (bf16 on CUDA, fp32 on CPU) and copy bandwidth, measured now on this device."""
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    m = 512 if tiny else 8192
    a, b = torch.randn(m, m, device=dev, dtype=dt), torch.randn(m, m, device=dev, dtype=dt)
    sec = timed(lambda: a @ b, dev, warmup=2, steps=3 if tiny else 20)
    n_bytes = (16 if tiny else 2048) * 2**20
    src, dst = torch.empty(n_bytes, dtype=torch.uint8, device=dev), torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    copy_sec = timed(lambda: dst.copy_(src), dev, warmup=2, steps=5 if tiny else 20)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"name": name, "matmul_dtype": str(dt).removeprefix("torch."), "matmul_tflops": 2 * m**3 / sec / 1e12,
            "copy_bandwidth_gbs": 2 * n_bytes / copy_sec / 1e9}  # a copy reads and writes every byte


def floor_tok_s(card: dict[str, Any], N: int, d: int, n: int, k: int) -> dict[str, float]:
    """Roofline floor of one TopK step: matmul phase at the measured rate + memory phase at the measured bandwidth.

    sparse model: encoder forward dense (2·N·d·n: every pre-activation is needed to pick the top k) + 8·N·k·d
    (decoder forward, code-value gradient, W_dec gradient, W_enc gradient — Gao et al. 2024 sparse kernels);
    dense_bwd model: the encoder backward as two dense matmuls too (3 × 2·N·d·n) + 6·N·k·d.
    Memory: ADAM_BYTES_PER_PARAM per parameter + 12·N·d (x read, x_hat written, its gradient read; fp32).
    """
    flops_s, bw = card["matmul_tflops"] * 1e12, card["copy_bandwidth_gbs"] * 1e9
    params = 2 * d * n + n + d
    mem_sec = (ADAM_BYTES_PER_PARAM * params + 12 * N * d) / bw
    sparse = (2 * N * d * n + 8 * N * k * d) / flops_s + mem_sec
    dense_bwd = (6 * N * d * n + 6 * N * k * d) / flops_s + mem_sec
    return {"floor_tok_s": N / sparse, "floor_dense_bwd_tok_s": N / dense_bwd}


# ---- training steps ----------------------------------------------------------------------------------------


def topk_params(d: int, n: int, dev: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """fp32 masters W_enc [d, n], b_enc [n], W_dec [n, d] (unit rows), b_dec [d]; encoder = decoder transpose."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    tensors = [W.t().contiguous(), torch.zeros(n), W, torch.zeros(d)]
    return [torch.nn.Parameter(t.to(dev)) for t in tensors]


def topk_step(backend: Backend, d: int, n: int, k: int, dev: torch.device, compile_step: bool, chunk: int | None = None,
              fused: bool = False) -> Callable[[torch.Tensor], None]:
    """One TopK step through ``pipeline.kernels`` with the given backend: forward, MSE, backward, Adam."""
    params = topk_params(d, n, dev)
    W_enc, b_enc, W_dec, b_dec = params
    opt = make_adam(params, lr=1e-4)
    dt = torch.bfloat16 if dev.type == "cuda" else None

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        out = topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, backend=backend, compute_dtype=dt, chunk=chunk,
                               fused_encoder=fused)
        return (out.x_hat - x).pow(2).sum(-1).mean()

    loss_fn = maybe_compile(loss_fn, compile_step)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        opt.step()

    return step


def sae_step(arch: str, d: int, n: int, k: int, dev: torch.device, compile_step: bool) -> Callable[[torch.Tensor], None]:
    """One step of ``pipeline.sae``'s ``arch`` following the trainer's protocol (pipeline/sae/base.py)."""
    from pipeline.sae import SAEConfig, make_sae
    from pipeline.train_setup import kernel_backend

    extra: dict[str, Any] = {}
    if arch == "dense":
        extra["hidden_sizes"] = [n // 4, n // 8, n // 4]
        n = n // 8
    sae = make_sae(SAEConfig(arch=arch, d_in=d, d_sae=n, k=k, **extra), seed=0).to(dev)
    sae.kernel_backend = kernel_backend("auto", arch, dev)  # what `train.kernels: auto` picks in the trainer
    opt = make_adam(sae.parameters(), lr=1e-4)
    use_bf16 = dev.type == "cuda"

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            # step 100 of 1000: past any warm-up. A transcoder trains on a pair: the batch stands in for its target
            # too (the step's cost does not depend on the values).
            pair = {"target": x} if getattr(sae, "is_transcoder", False) else {}
            return sae.training_loss(x, 100, 1000, **pair).loss

    loss_fn = maybe_compile(loss_fn, compile_step)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()

    return step


def run_variant(make: Callable[[], Callable[[torch.Tensor], None]], x: torch.Tensor, warmup: int, steps: int
                ) -> dict[str, Any]:
    dev = x.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    sec = timed(partial(make(), x), dev, warmup, steps)  # the step (model, optimizer) is freed on return
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"tok_s": x.shape[0] / sec, "step_ms": sec * 1e3, "peak_gpu_mem_bytes": peak}


# ---- data loader -------------------------------------------------------------------------------------------


def loader_rates(d: int, batch: int, n_tokens: int, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Tokens/s delivered to ``dev`` by the activation API's ``iter_batches`` and by the trainer's loader."""
    if importlib.util.find_spec("pipeline.activations") is None:
        return {"skipped": "pipeline.activations is not available"}
    from pipeline.activations import open_activations, write_activations

    root = workdir / f"acts_d{d}"
    if not root.exists():
        acts = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(0))
        write_activations(root, acts, hook="bench", dtype="float16")
    ds = open_activations(root)
    n_batches = ds.n_tokens // batch

    def drain(batches: Any) -> float:
        t0, seen = time.perf_counter(), 0
        for b in batches:
            seen += (b.acts if hasattr(b, "acts") else b).shape[0]
        sync(dev)
        return seen / (time.perf_counter() - t0)

    out: dict[str, Any] = {"tokens": n_batches * batch}
    out["iter_batches_tok_s"] = drain(ds.iter_batches(batch, shuffle=True, seed=0, device=dev, dtype=torch.float32,
                                                      drop_last=True))
    if importlib.util.find_spec("pipeline.loader") is not None:
        from pipeline.loader import train_batches

        out["train_batches_tok_s"] = drain(train_batches(ds, batch, seed=0, start_step=0, total_steps=n_batches,
                                                         device=dev, prefetch=4))
    return out


# ---- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke run in seconds)")
    p.add_argument("--size", action="append", metavar="D,N,K", help="d,n_latents,k (repeatable)")
    p.add_argument("--batch", action="append", type=int, help="tokens per step (repeatable)")
    p.add_argument("--archs", default="all", help="comma list of pipeline.sae archs, 'all', or 'none'")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20 GPU / 3 tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU / 1 tiny)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss of every variant")
    p.add_argument("--chunk", type=int, default=None, help="latents per encoder chunk in the kernels variant")
    p.add_argument("--loader-tokens", type=int, default=None, help="tokens in the loader's temp dataset")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       "cpu" if a.device == "auto" else a.device)
    tiny = a.tiny or dev.type == "cpu"
    sizes = [tuple(int(v) for v in s.split(",")) for s in a.size] if a.size else (TINY_SIZES if tiny else GPU_SIZES)
    batches = a.batch or (TINY_BATCHES if tiny else GPU_BATCHES)
    steps, warmup = a.steps or (3 if tiny else 20), a.warmup if a.warmup is not None else (1 if tiny else 5)
    archs: list[str] = []
    if a.archs != "none" and importlib.util.find_spec("pipeline.sae") is not None:
        from pipeline.sae import ARCHS

        archs = sorted(ARCHS) if a.archs == "all" else a.archs.split(",")
    torch.manual_seed(0)
    card = measure_card(dev, tiny)
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    report: dict[str, Any] = {
        "device": {"type": dev.type, "name": card["name"], "torch": torch.__version__, "triton": triton_version,
                   "kernel_backend": resolve_backend("auto", dev)},
        "card": card, "steps": steps, "warmup": warmup, "compile": a.compile, "results": [],
    }
    print(f"# {card['name']}: matmul {card['matmul_tflops']:.2f} TFLOP/s ({card['matmul_dtype']}), "
          f"copy {card['copy_bandwidth_gbs']:.1f} GB/s; kernel backend: {report['device']['kernel_backend']}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for d, n, k in sizes:
            for N in batches:
                x = torch.randn(N, d, device=dev)
                row: dict[str, Any] = {"d": d, "n_latents": n, "k": k, "batch": N, **floor_tok_s(card, N, d, n, k)}
                shape = (d, n, k, dev, a.compile)
                variants: dict[str, Callable[[], Callable[[torch.Tensor], None]]] = {
                    "reference": partial(topk_step, "torch", *shape),
                    "kernels": partial(topk_step, "auto", *shape, chunk=a.chunk),
                }
                if report["device"]["kernel_backend"] == "triton":  # fused matmul+TopK encoder: GPU only
                    variants["kernels_fused"] = partial(topk_step, "auto", *shape, fused=True)
                for arch in archs:
                    variants[f"sae:{arch}"] = partial(sae_step, arch, *shape)
                row["variants"] = {name: run_variant(make, x, warmup, steps) for name, make in variants.items()}
                ref, ours = row["variants"]["reference"]["tok_s"], row["variants"]["kernels"]["tok_s"]
                row["kernels_speedup_vs_reference"] = ours / ref
                n_load = a.loader_tokens or max(4 * N, (4096 if tiny else 262144))
                row["loader"] = loader_rates(d, N, n_load, dev, Path(tmp))
                ld = row["loader"]
                rate = ld.get("train_batches_tok_s", ld.get("iter_batches_tok_s"))  # what the trainer reads through
                if rate is not None:
                    ld["ratio_to_kernels_step"] = rate / ours
                report["results"].append(row)
                print_row(row)
    if a.out is not None:
        atomic_write_json(a.out, report)
        print(f"# wrote {a.out}")
    return report


def print_row(row: dict[str, Any]) -> None:
    print(f"\nd={row['d']} n={row['n_latents']} k={row['k']} batch={row['batch']}: floor {row['floor_tok_s']:,.0f} "
          f"tok/s (dense-bwd model {row['floor_dense_bwd_tok_s']:,.0f})")
    for name, v in row["variants"].items():
        mem = "" if v["peak_gpu_mem_bytes"] is None else f"  peak {v['peak_gpu_mem_bytes'] / 2**30:.2f} GiB"
        print(f"  {name:<16} {v['tok_s']:>14,.0f} tok/s  {v['step_ms']:9.2f} ms/step{mem}")
    ld = row["loader"]
    rates = "  ".join(f"{key.removesuffix('_tok_s')} {v:,.0f} tok/s" for key, v in ld.items() if key.endswith("_tok_s"))
    print(f"  loader: {rates or ld.get('skipped')}"
          + (f"  ({ld['ratio_to_kernels_step']:.1f}x the kernels step)" if "ratio_to_kernels_step" in ld else ""))


if __name__ == "__main__":
    main()
