"""Decoder-norm kernels (pipeline.kernels.decoder_norm) against the PyTorch code of pipeline.sae.ops, on CPU.

The kernels run compiled on CUDA when a GPU is present, else under the Triton interpreter (TRITON_INTERPRET=1).
Sizes are odd on purpose (d_sae=37; d_in=70, and 300 with 64-wide blocks) so every block has a masked tail and the
multi-block loop runs. The ``auto`` backend on CPU must stay the exact PyTorch code (bit-identical runs).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from pipeline.errors import UserError
from pipeline.kernels import triton_status
from pipeline.sae import ops

R = 37
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(70, None), (300, None), (300, 64), (1, None)]  # (d_in, block_d): one block, one block, 5 blocks, width 1


def _import_kernels_interpreted() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: decoder-norm kernels untested here (torch path still tested)"
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit at import time; stays set for this process
    importlib.import_module("pipeline.kernels.decoder_norm")
    return triton_status(DEVICE)


TRITON_OK, TRITON_WHY = _import_kernels_interpreted()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"Triton kernels not testable: {TRITON_WHY}")


def _w_g(d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows ``W [R, d_in]`` (as in training) and a gradient ``G [R, d_in]``, fp32."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, d_in, generator=g)
    W /= W.norm(dim=-1, keepdim=True)
    return W.to(DEVICE), torch.randn(R, d_in, generator=g).to(DEVICE)


def _project_ref(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return G.addcmul(W, torch.linalg.vecdot(G, W).unsqueeze(1), value=-1)  # the formula of ops.remove_parallel_grad_


def _normalize_ref(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(W.dtype).eps)  # ops.normalize_rows_


# ---- dispatch (always runs) -------------------------------------------------------------------------------


def test_auto_on_cpu_is_the_exact_torch_code() -> None:
    W, G = _w_g(70)
    if DEVICE != "cpu":
        W, G = W.cpu(), G.cpu()
    P = torch.nn.Parameter(W.clone())
    P.grad = G.clone()
    ops.remove_parallel_grad_(P)  # backend="auto"
    assert torch.equal(P.grad, _project_ref(W, G))  # bitwise: CPU runs stay reproducible
    raw = W * torch.linspace(0.5, 3.0, R)[:, None]
    V = raw.clone()
    ops.normalize_rows_(V)
    assert torch.equal(V, _normalize_ref(raw))


def test_bad_backend_is_user_error() -> None:
    with pytest.raises(UserError, match="backend"):
        ops.normalize_rows_(torch.ones(2, 3), backend="cuda-magic")  # type: ignore[arg-type]


# ---- kernels ----------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(("d_in", "block_d"), CASES)
def test_project_out_matches_torch_and_leaves_no_radial_part(d_in: int, block_d: int | None) -> None:
    from pipeline.kernels.decoder_norm import project_out_parallel_

    W, G = _w_g(d_in)
    out = G.clone()
    v0 = out._version
    project_out_parallel_(W, out, block_d=block_d)
    assert out._version > v0  # autograd sees the in-place write
    torch.testing.assert_close(out, _project_ref(W, G), atol=1e-6, rtol=1e-5)
    assert (out * W).sum(-1).abs().max().item() < 1e-5  # tangential: <G_r, W_r> ~ 0
    again = G.clone()
    project_out_parallel_(W, again, block_d=block_d)
    assert torch.equal(out, again)  # fixed reduction order: repeatable bits


@needs_triton
@pytest.mark.parametrize(("d_in", "block_d"), CASES)
def test_normalize_matches_torch_unit_norms_and_zero_rows(d_in: int, block_d: int | None) -> None:
    from pipeline.kernels.decoder_norm import normalize_rows_triton_

    W, _ = _w_g(d_in, seed=1)
    W = W * torch.linspace(0.1, 5.0, R, device=DEVICE)[:, None]
    W[3] = 0.0  # a zero row: stays zero, no NaN
    W[5] = 1e-30  # below eps: divided by eps, as in torch
    ref = _normalize_ref(W)
    eps = torch.finfo(W.dtype).eps
    normalize_rows_triton_(W, eps, block_d=block_d)
    assert not W.isnan().any()
    torch.testing.assert_close(W, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(W[3], torch.zeros_like(W[3]))
    live = torch.ones(R, dtype=torch.bool, device=DEVICE)
    live[[3, 5]] = False
    torch.testing.assert_close(W[live].norm(dim=-1), torch.ones(R - 2, device=DEVICE), atol=1e-6, rtol=0)


@needs_triton
def test_strided_views_are_read_and_written_in_place() -> None:
    from pipeline.kernels.decoder_norm import normalize_rows_triton_, project_out_parallel_

    d_in = 70
    W0, G0 = _w_g(d_in, seed=2)
    W_big = torch.zeros(R, 2 * d_in, device=DEVICE)
    W_big[:, ::2] = W0
    W = W_big[:, ::2]  # column stride 2
    G_t = G0.T.contiguous()
    G = G_t.T  # strides (1, R): transposed storage
    assert not W.is_contiguous() and not G.is_contiguous()
    project_out_parallel_(W, G, block_d=32)
    torch.testing.assert_close(G, _project_ref(W0, G0), atol=1e-6, rtol=1e-5)
    W.mul_(3.0)
    normalize_rows_triton_(W, torch.finfo(W.dtype).eps, block_d=32)
    torch.testing.assert_close(W, _normalize_ref(W0 * 3.0), atol=1e-6, rtol=1e-5)
    assert torch.equal(W_big[:, 1::2], torch.zeros(R, d_in, device=DEVICE))  # the gaps are untouched


@needs_triton
def test_ops_backend_triton_matches_torch() -> None:
    W, G = _w_g(300, seed=3)
    P_t, P_k = torch.nn.Parameter(W.clone()), torch.nn.Parameter(W.clone())
    P_t.grad, P_k.grad = G.clone(), G.clone()
    ops.remove_parallel_grad_(P_t, backend="torch")
    ops.remove_parallel_grad_(P_k, backend="triton")
    torch.testing.assert_close(P_k.grad, P_t.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        P_t.mul_(2.5), P_k.mul_(2.5)
    ops.normalize_rows_(P_t, backend="torch")
    ops.normalize_rows_(P_k, backend="triton")
    torch.testing.assert_close(P_k.data, P_t.data, atol=1e-6, rtol=1e-5)


@needs_triton
def test_bad_shapes_are_user_errors() -> None:
    from pipeline.kernels.decoder_norm import normalize_rows_triton_, project_out_parallel_

    with pytest.raises(UserError, match="2-D"):
        normalize_rows_triton_(torch.ones(3, device=DEVICE), 1e-7)
    with pytest.raises(UserError, match="does not match"):
        project_out_parallel_(torch.ones(3, 4, device=DEVICE), torch.ones(4, 3, device=DEVICE))
    project_out_parallel_(torch.ones(0, 4, device=DEVICE), torch.ones(0, 4, device=DEVICE))  # empty: no launch
