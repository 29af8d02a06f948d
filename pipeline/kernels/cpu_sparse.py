"""Sparse TopK SAE training on the CPU in plain PyTorch: gathers and sparse matmuls instead of ``[N, d_sae]`` codes.

The dense step (``train.kernels: torch``) decodes through a scattered ``[N, d_sae]`` code and backpropagates through
it: four dense matmuls of ``N·d·d_sae`` multiply-adds each and elementwise passes over ``[N, d_sae]``. Only the
encoder forward needs all ``d_sae`` pre-activations (to find the k largest); everything else touches the ``k``
active latents per token (Gao et al. 2024, *Scaling and evaluating sparse autoencoders*, "efficient training"):

* decoder forward ``x_hat[n] = b_dec + Σ_s val[n,s] · W_dec[idx[n,s]]`` — ``embedding_bag`` (a gather-sum);
* ``dL/dval[n,s] = <dL/dx_hat[n], W_dec[idx[n,s]]>`` — ``sampled_addmm`` at the code's non-zeros;
* ``dL/dW_dec = Sᵀ @ dL/dx_hat`` and ``dL/dW_encᵀ = Gᵀ @ xin`` — a CSR matrix with one row per latent (the
  code sorted by latent) times a dense ``[N, d]`` matrix, so only touched rows get work;
* AuxK selects among the dead latents' pre-activations only (``n_dead`` columns), none when no latent is dead.

Inactive slots (value 0: ReLU'd or dropped by BatchTopK) are dropped before any of it, so a BatchTopK code of width
``4k`` costs what its ``~k`` non-zeros cost. Reductions are in fp32 and in a fixed order: each output row of the CSR
products is one thread's sum over that latent's tokens in token order (a stable sort), so results do not depend on
the thread count; ``tests/test_kernels_cpu.py`` checks that and the match with the dense step.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

__all__ = ["SparseCodeCSR", "sparse_decode_cpu", "topk_encode_cpu"]



def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # the CSR layout is "beta" in PyTorch; what is used here is tested (see above)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class SparseCodeCSR:
    """The non-zeros of a code ``idx, val [N, w]`` (0 = inactive slot) in the two orders the products need.

    ``keep [N, w]`` bool; ``col [nnz]`` latent ids in token order; ``crow [N+1]`` each token's start; ``by_latent``
    the permutation that sorts the non-zeros by latent (stable: token order inside a latent); ``lat_crow [d_sae+1]``.
    """

    def __init__(self, idx: Tensor, val: Tensor, d_sae: int) -> None:
        self.shape = idx.shape
        self.d_sae = d_sae
        self.keep = val.detach() != 0  # [N, w]
        self.col = idx[self.keep]  # [nnz] int64, row-major: token order
        per_row = self.keep.sum(1)  # [N]
        self.crow = torch.zeros(idx.shape[0] + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(per_row, 0, out=self.crow[1:])
        self.row = torch.repeat_interleave(torch.arange(idx.shape[0], device=idx.device), per_row)  # [nnz]
        self.by_latent = torch.sort(self.col, stable=True).indices  # [nnz] (argsort is ~10x slower here)
        self.lat_crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(torch.bincount(self.col, minlength=d_sae), 0, out=self.lat_crow[1:])

    def by_token(self, values: Tensor) -> Tensor:
        """CSR ``[N, d_sae]`` with ``values [nnz]`` (token order)."""
        n = self.shape[0]
        return _csr(self.crow, self.col, values, (n, self.d_sae))

    def by_latent_t(self, values: Tensor) -> Tensor:
        """CSR ``[d_sae, N]`` (the transpose) with ``values [nnz]`` given in token order."""
        n = self.shape[0]
        return _csr(self.lat_crow, self.row[self.by_latent], values[self.by_latent], (self.d_sae, n))

    def latent_sums(self, values: Tensor) -> Tensor:
        """``[d_sae]`` fp32: Σ of ``values [nnz]`` per latent (serial 1-D ``index_add_``: one fixed order)."""
        out = torch.zeros(self.d_sae, dtype=torch.float32, device=values.device)
        return out.index_add_(0, self.col, values.float())

    def scatter_back(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """``values [nnz]`` -> ``[N, w]`` with 0 at the inactive slots."""
        out = torch.zeros(self.shape, dtype=dtype, device=values.device)
        out[self.keep] = values.to(dtype)
        return out


class SparseDecodeCPU(torch.autograd.Function):
    """``x_hat [N, d] (fp32) = b_dec + Σ_s val[n,s] · W_dec[idx[n,s]]``, fp32 throughout (gathers are cheap)."""

    @staticmethod
    def forward(ctx: FunctionCtx, idx: Tensor, val: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        code = SparseCodeCSR(idx, val, W_dec.shape[0])
        nz = val[code.keep].float()  # [nnz]
        W = W_dec.float()
        out = F.embedding_bag(code.col, W, code.crow[:-1], mode="sum", per_sample_weights=nz)  # [N, d]
        ctx.save_for_backward(nz, W)
        ctx.code, ctx.dtypes = code, (val.dtype, W_dec.dtype, b_dec.dtype)  # type: ignore[attr-defined]
        return out + b_dec.float()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[None, Tensor | None, Tensor | None, Tensor | None]:
        nz, W = ctx.saved_tensors  # type: ignore[attr-defined]
        code: SparseCodeCSR = ctx.code  # type: ignore[attr-defined]
        val_dt, w_dt, b_dt = ctx.dtypes  # type: ignore[attr-defined]
        _, need_val, need_w, need_b = ctx.needs_input_grad  # type: ignore[attr-defined]
        g = grad_out.float().contiguous()  # [N, d]
        grad_val = grad_W = grad_b = None
        if need_val:  # <g[n], W[idx]> at the non-zeros only (0 at inactive slots, whose gradient no caller uses)
            dots = torch.sparse.sampled_addmm(code.by_token(torch.zeros_like(nz)), g, W.t(), beta=0.0)
            grad_val = code.scatter_back(dots.values(), val_dt)
        if need_w:  # Sᵀ @ g: rows of latents not in the code come out 0
            grad_W = (code.by_latent_t(nz) @ g).to(w_dt)
        if need_b:
            grad_b = g.sum(0).to(b_dt)
        return None, grad_val, grad_W, grad_b


def sparse_decode_cpu(idx: Tensor, val: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Sparse decoder; ``idx, val [N, w]`` (0 = inactive), ``W_dec [d_sae, d]``, ``b_dec [d]`` -> ``[N, d]`` fp32."""
    return SparseDecodeCPU.apply(idx, val, W_dec, b_dec)


def _select(pre: Tensor, k: int, dead: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK code and the AuxK code among ``dead`` latents of pre-activations ``pre [n, d_sae]``, values ReLU'd."""
    val, idx = pre.topk(k, dim=-1, sorted=False)  # [n, k]
    n_dead = 0 if dead is None else int(dead.sum())  # a host sync: free on the CPU
    if n_dead == 0:
        empty = pre.new_zeros(pre.shape[0], 0)
        return idx, val.relu(), empty.long(), empty
    dead_ids = dead.nonzero().flatten()  # type: ignore[union-attr]
    aux_val, pos = pre.index_select(1, dead_ids).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    return idx, val.relu(), dead_ids[pos], aux_val.relu()


class TopKEncodeCPU(torch.autograd.Function):
    """``ReLU(TopK((x - b_pre) @ W_enc + b_enc))`` and the AuxK code (top ``k_aux`` dead latents), sparse backward.

    The matmul runs in ``cdt`` (bf16 on CPUs with AMX) on casts of the fp32 masters; gradients are fp32:
    ``dL/dW_encᵀ = Gᵀ @ xin`` over the non-zeros, ``dL/db_enc`` their per-latent sums and
    ``dL/db_pre = -W_enc @ dL/db_enc`` (the centering's gradient without the input's).
    Returns ``(idx [N, k], val [N, k], aux_idx [N, k_a], aux_val [N, k_a])``, ``k_a = min(k_aux, n_dead)``.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_pre: Tensor | None, k: int,
                cdt: torch.dtype, dead: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xin = (x if b_pre is None else x - b_pre).float()  # [N, d]
        pre = torch.addmm(b_enc.to(cdt), xin.to(cdt), W_enc.to(cdt))  # [N, d_sae]: the one dense tensor
        idx, val, aux_idx, aux_val = _select(pre, k, dead, k_aux)
        del pre
        ctx.save_for_backward(xin, W_enc, torch.cat([idx, aux_idx], 1), torch.cat([val, aux_val], 1))
        ctx.mark_non_differentiable(idx, aux_idx)
        ctx.k, ctx.dtypes = k, (x.dtype, b_pre.dtype if b_pre is not None else None)  # type: ignore[attr-defined]
        return idx, val, aux_idx, aux_val

    @staticmethod
    def backward(ctx: FunctionCtx, _gi: Tensor | None, grad_val: Tensor | None, _ga: Tensor | None,
                 grad_aux: Tensor | None) -> tuple[Tensor | None, ...]:
        xin, W_enc, idx, val = ctx.saved_tensors  # type: ignore[attr-defined]
        k = ctx.k  # type: ignore[attr-defined]
        x_dt, pre_dt = ctx.dtypes  # type: ignore[attr-defined]
        gv = torch.zeros_like(val[:, :k]) if grad_val is None else grad_val
        ga = torch.zeros_like(val[:, k:]) if grad_aux is None else grad_aux
        g_all = torch.cat([gv, ga], 1).float()  # [N, k + k_a]
        # Non-zeros: val > 0 (ReLU' = 1) with a gradient (BatchTopK's dropped candidates have none). A latent in
        # both codes of a token appears twice in the CSR; the products add both terms.
        code = SparseCodeCSR(idx, torch.where(g_all != 0, val, 0), W_enc.shape[1])
        g = g_all[code.keep]  # [nnz]
        need_x, need_w, need_b, need_pre = ctx.needs_input_grad[:4]  # type: ignore[attr-defined]
        grad_x = grad_W = grad_b = grad_pre = None
        if need_x:
            grad_x = (code.by_token(g) @ W_enc.float().t()).to(x_dt)
        if need_w:
            grad_W = (code.by_latent_t(g) @ xin).t()  # [d, d_sae] view of a [d_sae, d] product
        if need_b or need_pre:
            sums = code.latent_sums(g)  # [d_sae]
            grad_b = sums if need_b else None
            if need_pre:
                grad_pre = -torch.mv(W_enc.float(), sums).to(pre_dt)  # [d]
        return grad_x, grad_W, grad_b, grad_pre, None, None, None, None


def topk_encode_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, cdt: torch.dtype, dead: Tensor | None = None,
                    k_aux: int = 0, b_pre: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK code and the dead latents' AuxK code from one encoder matmul; see :class:`TopKEncodeCPU`."""
    return TopKEncodeCPU.apply(x, W_enc, b_enc, b_pre, k, cdt, dead, k_aux)
