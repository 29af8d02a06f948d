"""Kernels of pipeline.kernels against the plain PyTorch reference, on CPU.

The Triton kernels run compiled on CUDA when a GPU is present, else on CPU under the Triton interpreter
(TRITON_INTERPRET=1); sizes are odd on purpose (N=37, d=24, d_sae=70, k=5) so that every block has a masked tail.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.errors import UserError
from pipeline.kernels import SparseCode, make_adam, resolve_backend, topk_sae_forward, triton_status
from pipeline.kernels.reference import (
    batch_threshold,
    chunked_topk,
    dense_decode_torch,
    sparse_decode_torch,
    topk_encode_torch,
)

N, D, D_SAE, K = 37, 24, 70, 5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton tests run where the kernels would


def _import_kernels_interpreted() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: Triton kernels untested here (torch reference path still tested)"
    if DEVICE == "cpu":
        # Read by @triton.jit at import time and by Triton's lazy imports at launch time, so it stays set for the
        # rest of this process (it only affects Triton kernels, which nothing else runs on CPU).
        os.environ["TRITON_INTERPRET"] = "1"
    importlib.import_module("pipeline.kernels.triton_sparse")
    return triton_status(DEVICE)


TRITON_OK, TRITON_WHY = _import_kernels_interpreted()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"Triton kernels not testable: {TRITON_WHY}")


def _weights(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh leaf tensors W_enc [D, D_SAE], b_enc [D_SAE], W_dec [D_SAE, D], b_dec [D] (same values each call)."""
    g = torch.Generator().manual_seed(1)
    W_enc, b_enc, W_dec, b_dec = (torch.randn(*s, generator=g) * 0.3 for s in [(D, D_SAE), (D_SAE,), (D_SAE, D), (D,)])
    return tuple(t.to(DEVICE, dtype).requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec))  # type: ignore[return-value]


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    grads = [t.grad for t in tensors]
    assert all(g is not None for g in grads)
    return grads  # type: ignore[return-value]


def _code(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A random sparse code: idx [N, K] distinct latents per row (latents >= 60 never used), val [N, K]."""
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(60, generator=g)[:K] for _ in range(N)])
    val = torch.rand(N, K, generator=g).to(dtype)
    val[0, 1] = 0.0  # an inactive slot
    return idx.to(DEVICE), val.to(DEVICE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- reference path (always runs) -------------------------------------------------------------------------


def test_reference_decoders_agree_and_match_hand_value() -> None:
    idx, val = _code()
    W, _, Wd, b = (t.detach() for t in _weights())
    assert torch.allclose(sparse_decode_torch(idx, val, Wd, b), dense_decode_torch(idx, val, Wd, b), atol=1e-5)
    # hand value: one token, latents 2 and 0 with values 2 and 3 -> 2*W[2] + 3*W[0] + b
    Wh = torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, 1.0]])
    out = sparse_decode_torch(torch.tensor([[2, 0]]), torch.tensor([[2.0, 3.0]]), Wh, torch.tensor([0.5, -0.5]))
    assert torch.equal(out, torch.tensor([[3.5, 1.5]]))


def test_chunked_topk_equals_full_topk() -> None:
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    W, b = (t.detach().cpu() for t in _weights()[:2])
    full_val, full_idx = (x @ W + b).topk(K, dim=-1)
    for chunk in (None, 3, 16, 69, 70):
        val, idx = chunked_topk(x, W, b, K, chunk)
        assert torch.equal(idx, full_idx), chunk
        assert torch.allclose(val, full_val, atol=1e-6), chunk


def test_batch_threshold_hand_example() -> None:
    cand = torch.tensor([[5.0, 4.0, 1.0], [3.0, 2.0, 0.5]])
    # keep the 3 largest of the batch: 5, 4, 3
    assert torch.equal(batch_threshold(cand, 3), torch.tensor([[5.0, 4.0, 0.0], [3.0, 0.0, 0.0]]))


def test_topk_encode_torch_applies_relu_after_topk() -> None:
    x = torch.tensor([[1.0, 0.0]])
    W = torch.tensor([[1.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    idx, val = topk_encode_torch(x, W, torch.zeros(3), 2)
    assert idx.tolist() == [[0, 1]] and val.tolist() == [[1.0, 0.0]]  # -1 kept by TopK, zeroed by ReLU


def test_auto_backend_is_torch_on_cpu_and_bad_backend_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(UserError, match="backend"):
        resolve_backend("cuda-magic", "cpu")  # type: ignore[arg-type]
    monkeypatch.setattr("pipeline.kernels.dispatch.triton_status", lambda dev: (False, "no triton here"))
    with pytest.raises(UserError, match="no triton here"):
        resolve_backend("triton", "cpu")


def test_make_adam_on_cpu_is_unfused_and_steps() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_adam([p], lr=0.1)
    assert not opt.param_groups[0]["fused"]
    p.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))  # Adam's first step moves by lr·sign(g)


# ---- Triton kernels (interpreter) ---------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_sparse_decode_forward_and_grads(dtype: torch.dtype, tol: float) -> None:
    from pipeline.kernels import sparse_decode

    idx, val0 = _code(dtype)
    _, _, Wd0, b0 = _weights(dtype)
    g_out = torch.randn(N, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for fn in (sparse_decode, sparse_decode_torch):
        val, Wd, b = (t.detach().clone().requires_grad_() for t in (val0, Wd0, b0))
        out = fn(idx, val, Wd, b)
        out.backward(g_out)
        results.append((out.detach(), *_grads(val, Wd, b)))
    (o, gv, gw, gb), (o_ref, gv_ref, gw_ref, gb_ref) = results
    assert o.dtype == torch.float32 and gw.dtype == dtype
    assert _rel(o, o_ref) < 1e-6  # same bf16 inputs, both accumulate in fp32
    for got, ref in ((gv, gv_ref), (gw, gw_ref), (gb, gb_ref)):
        assert _rel(got, ref) < tol
    assert torch.count_nonzero(gw[60:]) == 0  # never-selected latents: exactly zero gradient rows


@needs_triton
def test_fused_topk_matches_torch_topk_over_several_latent_tiles() -> None:
    from pipeline.kernels.triton_sparse import fused_topk

    g = torch.Generator().manual_seed(7)
    x, W, b = (torch.randn(*s, generator=g).to(DEVICE) for s in [(N, D), (D, 300), (300,)])
    val, idx = fused_topk(x, W, b, K)  # 300 latents = 3 tiles of 128, the last one masked
    ref_val, ref_idx = (x @ W + b).topk(K, dim=-1)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(val, ref_val, atol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "arch,chunk,fused", [("topk", 16, False), ("batchtopk", None, False), ("topk", None, True), ("batchtopk", 16, True)]
)
def test_topk_sae_forward_triton_matches_torch_fp32(arch: str, chunk: int | None, fused: bool) -> None:
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    results: list[tuple[SparseCode, torch.Tensor, list[torch.Tensor]]] = []
    for backend in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        W_enc, b_enc, W_dec, b_dec = params = _weights()
        out = topk_sae_forward(
            x, W_enc, b_enc, W_dec, b_dec, K, backend=backend, arch=arch, chunk=chunk, fused_encoder=fused  # type: ignore[arg-type]
        )
        ((out.x_hat - x0) ** 2).sum().backward()
        results.append((out, _grads(x)[0], _grads(*params)))
    (o, gx, gp), (o_ref, gx_ref, gp_ref) = results
    assert torch.equal(o.top_idx, o_ref.top_idx)
    assert _rel(o.x_hat, o_ref.x_hat) < 1e-5
    assert _rel(gx, gx_ref) < 1e-4
    for got, ref in zip(gp, gp_ref, strict=True):
        assert _rel(got, ref) < 1e-4
    if arch == "batchtopk":
        assert (o.top_val > 0).sum() <= N * K  # the batch keeps at most N*k activations


@needs_triton
def test_topk_sae_forward_bf16_within_tolerance_and_deterministic() -> None:
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    runs = []
    for backend in ("triton", "triton", "torch"):
        W_enc, b_enc, W_dec, b_dec = params = _weights()  # fp32 masters, bf16 compute
        out = topk_sae_forward(
            x, W_enc, b_enc, W_dec, b_dec, K, backend=backend, compute_dtype=torch.bfloat16  # type: ignore[arg-type]
        )
        ((out.x_hat - x) ** 2).mean().backward()
        runs.append((out.x_hat.detach(), _grads(*params)))
    (o1, g1), (o2, g2), (o_ref, g_ref) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))  # bitwise repeatable
    assert all(g.dtype == torch.float32 for g in g1)  # fp32 master weights get fp32 gradients
    assert _rel(o1, o_ref) < 1e-2
    for got, ref in zip(g1, g_ref, strict=True):
        assert _rel(got, ref) < 3e-2


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_h100_without_a_gpu(tmp_path: Path) -> None:
    # The interpreter accepts code the compiler rejects: lower every kernel to an sm_90 cubin in a fresh process
    # (TRITON_INTERPRET unset there), with Triton's bundled ptxas.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.kernels.compile_check", "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = dict(line.split(maxsplit=1) for line in proc.stderr.splitlines() if line.strip())
    for name in ("gather_rows", "gather_dot", "segment_outer", "fused_topk_bf16", "fused_topk_fp32",
                 "decoder_project_one_block", "decoder_project_looped", "decoder_normalize_one_block",
                 "decoder_normalize_looped"):
        assert lines.get(name) == "ok", proc.stderr[-2000:]
    assert proc.returncode == 0


# ---- the SAE training step through the kernels (what `train.kernels: triton` runs) ------------------------


PAIR_DEAD = torch.arange(D_SAE) < 30  # [d_sae]: the trainer's dead mask; AuxK has work to do


def _sae_pair(arch: str, k: int) -> tuple[Any, Any]:
    """Two identical SAEs, one on the dense torch path and one on the Triton path (:data:`PAIR_DEAD`: 30 dead latents)."""
    from pipeline.sae import SAEConfig, make_sae

    cfg = SAEConfig(arch=arch, d_in=D, d_sae=D_SAE, k=k)
    dense = make_sae(cfg, seed=3).to(DEVICE)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 2 + 0.5
    dense.init_from_data(x)
    sparse = copy.deepcopy(dense)
    sparse.kernel_backend = "triton"
    return dense, sparse


@needs_triton
@pytest.mark.parametrize(("arch", "k"), [("topk", K), ("batchtopk", K)])
def test_sae_training_loss_on_kernels_matches_dense_path(arch: str, k: int) -> None:
    dense, sparse = _sae_pair(arch, k)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 2 + 0.5
    outs = []
    for sae in (dense, sparse):
        out = sae.training_loss(x, 10, 100, PAIR_DEAD.to(DEVICE))
        out.loss.backward()
        outs.append(out)
    a, b = outs
    assert b.latents is None and b.code is not None  # the dense [N, d_sae] latents were never built
    assert torch.allclose(a.loss, b.loss, rtol=1e-5) and a.terms["auxk"] > 0
    assert torch.allclose(a.x_hat, b.x_hat, atol=1e-5)
    for key in ("mse", "l0", "auxk"):
        assert torch.allclose(a.terms[key], b.terms[key], rtol=1e-5), key
    counts_a, l0_a = a.firing(D_SAE)
    counts_b, l0_b = b.firing(D_SAE)
    assert torch.equal(counts_a, counts_b) and torch.equal(l0_a, l0_b)
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert _rel(q.grad, p.grad) < 1e-5, name
    if arch == "batchtopk":
        assert torch.equal(dense.threshold, sparse.threshold) and dense.threshold > 0


@needs_triton
def test_train_sae_with_triton_kernels_follows_the_dense_run(tmp_path: Path) -> None:
    from pipeline.activations import open_activations
    from pipeline.params.sae import TrainParams
    from pipeline.sae import SAEConfig
    from pipeline.synthetic import write_synthetic_activations
    from pipeline.train import train_sae

    write_synthetic_activations(tmp_path / "acts", n_tokens=256, d_model=D, n_features=30, k_true=3, seed=1,
                                dtype="float32")
    ds = open_activations(tmp_path / "acts")
    cfg = SAEConfig(arch="topk", d_in=D, d_sae=D_SAE, k=K, hook="synthetic")
    runs = {}
    for backend in ("torch", "triton"):
        params = TrainParams(device="cpu", dtype="float32", batch_size=64, lr=1e-3, n_tokens=256, warmup_steps=0,
                             log_every=2, val_every=0, checkpoint_every=0, prefetch=0, kernels=backend)
        rows: list[dict[str, Any]] = []
        sae = train_sae(ds, cfg, params, tmp_path / backend, tmp_path / f"{backend}_ckpt", seed=2, log_fn=rows.append).sae
        runs[backend] = (sae.state_dict(), [r for r in rows if r["kind"] == "train"])
    (w_dense, curve_dense), (w_sparse, curve_sparse) = runs["torch"], runs["triton"]
    for name, p in w_dense.items():
        assert torch.allclose(p.float(), w_sparse[name].float(), atol=1e-4), name
    assert [r["l0"] for r in curve_sparse] == pytest.approx([r["l0"] for r in curve_dense])
    assert [r["fvu"] for r in curve_sparse] == pytest.approx([r["fvu"] for r in curve_dense], rel=1e-4)


def test_triton_kernels_for_an_arch_without_them_is_a_user_error() -> None:
    from pipeline.train_setup import kernel_backend

    with pytest.raises(UserError, match="train.kernels: 'triton' supports sae.arch topk and batchtopk, not 'relu_l1'"):
        kernel_backend("triton", "relu_l1", torch.device("cpu"))
    assert kernel_backend("auto", "relu_l1", torch.device("cpu")) == "torch"
    assert kernel_backend("torch", "topk", torch.device("cpu")) == "torch"
