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

A TopK code is used whole (its rare ReLU'd zeros add nothing), one layout shared by the decoder and the encoder
backward; a BatchTopK code of width ``4k`` keeps only its ``~k`` non-zeros. Reductions are in fp32 and in a fixed
order: each output row of the CSR products is one thread's sum over that latent's tokens in token order (a stable
sort), so results do not depend on the thread count; ``tests/test_kernels_cpu.py`` checks that and the match with
the dense step. The small bookkeeping ops run on one thread (:func:`serial`), the heavy kernels on all.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

__all__ = ["SparseCodeCSR", "serial", "sparse_decode_cpu", "topk_encode_cpu"]

_full_threads: int | None = None  # the caller's thread count while ``serial()`` is active


@contextmanager
def serial() -> Iterator[None]:
    """Run the enclosed ops on one thread, except inside :func:`parallel` (the heavy kernels: the caller's count).

    A parallel op synchronises its threads; on cores shared with other processes each wait can cost a time slice
    (measured on 2 cores under load: a ReLU over a ``[4096, 32]`` code 9 ms on two threads, 12 µs on one). So the
    bookkeeping over ``[N, k]`` codes and ``[N, d]`` rows runs serially, the matmuls, top-k and gathers in parallel.
    Thread counts change the speed, not the numbers: each op always runs with the same count.
    """
    global _full_threads
    outer, prev = torch.get_num_threads(), _full_threads
    _full_threads = outer if prev is None else prev
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(outer)
        _full_threads = prev


@contextmanager
def parallel() -> Iterator[None]:
    """Inside :func:`serial`: the caller's thread count again (elsewhere: nothing changes)."""
    now = torch.get_num_threads()
    if _full_threads is None or _full_threads == now:
        yield
        return
    torch.set_num_threads(_full_threads)
    try:
        yield
    finally:
        torch.set_num_threads(now)



def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # the CSR layout is "beta" in PyTorch; what is used here is tested (see above)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class SparseCodeCSR:
    """The entries of a code ``idx [N, w]`` in the two orders the products need: all of them (``keep`` None: a TopK
    code, whose rare zeros add nothing) or those where ``keep [N, w]`` (bool) is set.

    ``col [nnz]`` latent ids in token order; ``crow [N+1]`` each token's start; ``row [nnz]`` each entry's token;
    ``by_latent`` the permutation that sorts the entries by latent (stable: token order inside a latent) and
    ``lat_crow [d_sae+1]`` each latent's start, computed on first use (a backward pass).
    """

    def __init__(self, idx: Tensor, d_sae: int, keep: Tensor | None = None) -> None:
        n, w = idx.shape
        self.shape, self.d_sae, self.keep = idx.shape, d_sae, keep
        dev = idx.device
        if keep is None:
            self.col = idx.reshape(-1)  # [N*w] int64, row-major: token order
            self.crow = torch.arange(0, n * w + 1, w, device=dev)
            self.row = torch.arange(n, device=dev).repeat_interleave(w)
        else:
            self.col = idx[keep]  # [nnz]
            per_row = keep.sum(1)  # [N]
            self.crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
            torch.cumsum(per_row, 0, out=self.crow[1:])
            self.row = torch.repeat_interleave(torch.arange(n, device=dev), per_row)

    @cached_property
    def by_latent(self) -> Tensor:
        """``[nnz]`` int64: the stable sort of ``col``. On CPU numpy's single-threaded one: torch's parallel sort
        synchronises its threads many times, and on cores shared with other processes each wait costs a time slice
        (measured: 5 ms on one thread, 200 ms on two under load, for 131k entries)."""
        if self.col.device.type == "cpu":
            return torch.from_numpy(np.argsort(self.col.numpy(), kind="stable"))
        return torch.sort(self.col, stable=True).indices

    @cached_property
    def lat_crow(self) -> Tensor:
        out = torch.zeros(self.d_sae + 1, dtype=torch.int64, device=self.col.device)
        torch.cumsum(torch.bincount(self.col, minlength=self.d_sae), 0, out=out[1:])
        return out

    def entries(self, values: Tensor) -> Tensor:
        """``values [N, w]`` -> ``[nnz]`` in token order."""
        return values.reshape(-1) if self.keep is None else values[self.keep]

    def by_token(self, values: Tensor) -> Tensor:
        """CSR ``[N, d_sae]`` with ``values [nnz]`` (token order)."""
        return _csr(self.crow, self.col, values, (self.shape[0], self.d_sae))

    @cached_property
    def row_by_latent(self) -> Tensor:
        return self.row[self.by_latent]  # [nnz]

    def by_latent_t(self, values: Tensor, permuted: bool = False) -> Tensor:
        """CSR ``[d_sae, N]`` (the transpose) with ``values [nnz]`` given in token order (``permuted``: already
        in latent order)."""
        v = values if permuted else values[self.by_latent]
        return _csr(self.lat_crow, self.row_by_latent, v, (self.d_sae, self.shape[0]))

    def to_token_order(self, values: Tensor) -> Tensor:
        """``values [nnz]`` in latent order -> token order."""
        out = torch.empty_like(values)
        out[self.by_latent] = values
        return out

    def latent_sums(self, values: Tensor) -> Tensor:
        """``[d_sae]`` fp32: Σ of ``values [nnz]`` per latent (``bincount``'s serial loop: one fixed order)."""
        return torch.bincount(self.col, weights=values.float(), minlength=self.d_sae).float()

    def scatter_back(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """``values [nnz]`` -> ``[N, w]``, 0 at the entries not kept."""
        if self.keep is None:
            return values.to(dtype).view(self.shape)
        out = torch.zeros(self.shape, dtype=dtype, device=values.device)
        out[self.keep] = values.to(dtype)
        return out


class SparseDecodeCPU(torch.autograd.Function):
    """``x_hat [N, d] (fp32) = b_dec + Σ_s val[n,s] · W_dec[idx[n,s]]``, fp32 throughout (gathers are cheap)."""

    @staticmethod
    def forward(ctx: FunctionCtx, idx: Tensor, val: Tensor, W_dec: Tensor, b_dec: Tensor,
                code: SparseCodeCSR | None) -> Tensor:
        with serial():
            if code is None:  # drop the inactive slots (BatchTopK's dropped candidates: most of its code)
                code = SparseCodeCSR(idx, W_dec.shape[0], val.detach() != 0)
            nz = code.entries(val).float()  # [nnz]
            W = W_dec.float()
            with parallel():
                out = F.embedding_bag(code.col, W, code.crow[:-1], mode="sum", per_sample_weights=nz)  # [N, d]
            ctx.save_for_backward(nz, W)
            ctx.code, ctx.dtypes = code, (val.dtype, W_dec.dtype, b_dec.dtype)  # type: ignore[attr-defined]
            return out + b_dec.float()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        nz, W = ctx.saved_tensors  # type: ignore[attr-defined]
        code: SparseCodeCSR = ctx.code  # type: ignore[attr-defined]
        val_dt, w_dt, b_dt = ctx.dtypes  # type: ignore[attr-defined]
        _, need_val, need_w, need_b, _ = ctx.needs_input_grad  # type: ignore[attr-defined]
        with serial():
            g = grad_out.float().contiguous()  # [N, d]
            grad_val = grad_W = grad_b = None
            if need_val:  # <g[n], W[idx]> at the entries only (0 at slots not kept, whose gradient no caller uses),
                # sampled in latent order: W is read as it lies and only g [N, d] is transposed, not W [d_sae, d]
                st = code.by_latent_t(torch.zeros_like(nz), permuted=True)
                with parallel():
                    dots = torch.sparse.sampled_addmm(st, W, g.t(), beta=0.0)
                grad_val = code.scatter_back(code.to_token_order(dots.values()), val_dt)
            if need_w:  # Sᵀ @ g: rows of latents not in the code come out 0
                st = code.by_latent_t(nz)
                with parallel():
                    grad_W = (st @ g).to(w_dt)
            if need_b:
                grad_b = g.sum(0).to(b_dt)
        return None, grad_val, grad_W, grad_b, None


def sparse_decode_cpu(idx: Tensor, val: Tensor, W_dec: Tensor, b_dec: Tensor,
                      code: SparseCodeCSR | None = None) -> Tensor:
    """Sparse decoder; ``idx, val [N, w]`` (0 = inactive), ``W_dec [d_sae, d]``, ``b_dec [d]`` -> ``[N, d]`` fp32.

    ``code``: the layout of ``idx`` when the caller has it (:func:`topk_encode_cpu`'s, for a TopK code decoded
    whole); None builds one over the non-zeros of ``val``.
    """
    return SparseDecodeCPU.apply(idx, val, W_dec, b_dec, code)


def _select(pre: Tensor, k: int, dead: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK code and the AuxK code among ``dead`` latents of pre-activations ``pre [n, d_sae]``, values ReLU'd."""
    with parallel():
        val, idx = pre.topk(k, dim=-1, sorted=False)  # [n, k]
    n_dead = 0 if dead is None else int(dead.sum())  # a host sync: free on the CPU
    if n_dead == 0:
        empty = pre.new_zeros(pre.shape[0], 0)
        return idx, val.relu(), empty.long(), empty
    dead_ids = dead.nonzero().flatten()  # type: ignore[union-attr]
    with parallel():
        aux_val, pos = pre.index_select(1, dead_ids).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    return idx, val.relu(), dead_ids[pos], aux_val.relu()


class TopKEncodeCPU(torch.autograd.Function):
    """``ReLU(TopK((x - b_pre) @ W_enc + b_enc))`` and the AuxK code (top ``k_aux`` dead latents), sparse backward.

    The matmul runs in ``cdt`` (bf16 on CPUs with AMX) on casts of the fp32 masters; gradients are fp32:
    ``dL/dW_encᵀ = Gᵀ @ xin`` over the entries with a gradient, ``dL/db_enc`` their per-latent sums and
    ``dL/db_pre = -W_enc @ dL/db_enc`` (the centering's gradient without the input's).
    Returns ``(idx [N, k], val [N, k], aux_idx [N, k_a], aux_val [N, k_a])``, ``k_a = min(k_aux, n_dead)``, and
    appends the TopK code's :class:`SparseCodeCSR` to ``layout`` (the decoder and this backward share it).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_pre: Tensor | None, k: int,
                cdt: torch.dtype, dead: Tensor | None, k_aux: int, layout: list[SparseCodeCSR],
                workspace: dict[str, Tensor] | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with serial():
            xin = (x if b_pre is None else x - b_pre).float()  # [N, d]
            shape = (x.shape[0], W_enc.shape[1])
            buf = None if workspace is None else workspace.get("pre")
            if workspace is not None and (buf is None or buf.shape != shape or buf.dtype != cdt
                                          or buf.device != x.device):
                buf = workspace["pre"] = torch.empty(shape, dtype=cdt, device=x.device)
            with parallel():  # [N, d_sae]: the one dense tensor
                pre = torch.addmm(b_enc.to(cdt), xin.to(cdt), W_enc.to(cdt), out=buf)
            idx, val, aux_idx, aux_val = _select(pre, k, dead, k_aux)
            del pre
            code = SparseCodeCSR(idx, W_enc.shape[1])  # every entry of the TopK code
        layout.append(code)
        if aux_idx.shape[1] == 0:
            ctx.code = code  # type: ignore[attr-defined]
            ctx.save_for_backward(xin, W_enc, idx, val)
        else:  # the backward runs once over both codes side by side
            ctx.code = None  # type: ignore[attr-defined]
            ctx.save_for_backward(xin, W_enc, torch.cat([idx, aux_idx], 1), torch.cat([val, aux_val], 1))
        ctx.mark_non_differentiable(idx, aux_idx)
        ctx.k, ctx.dtypes = k, (x.dtype, b_pre.dtype if b_pre is not None else None)  # type: ignore[attr-defined]
        return idx, val, aux_idx, aux_val

    @staticmethod
    def backward(ctx: FunctionCtx, _gi: Tensor | None, grad_val: Tensor | None, _ga: Tensor | None,
                 grad_aux: Tensor | None) -> tuple[Tensor | None, ...]:
        with serial():
            xin, W_enc, idx, val = ctx.saved_tensors  # type: ignore[attr-defined]
            k = ctx.k  # type: ignore[attr-defined]
            x_dt, pre_dt = ctx.dtypes  # type: ignore[attr-defined]
            gv = torch.zeros_like(val[:, :k]) if grad_val is None else grad_val
            ga = torch.zeros_like(val[:, k:]) if grad_aux is None else grad_aux
            g_all = torch.where(val > 0, torch.cat([gv, ga], 1).float(), 0.0)  # [N, k + k_a]: ReLU' · dL/dval
            code: SparseCodeCSR | None = ctx.code  # type: ignore[attr-defined]
            if code is None or 2 * int((g_all != 0).sum()) < g_all.numel():
                # The entries with a gradient only (BatchTopK's dropped candidates have none). A latent in both codes
                # of a token appears twice; the products add both terms.
                code = SparseCodeCSR(idx, W_enc.shape[1], g_all != 0)
            g = code.entries(g_all)  # [nnz]
            need_x, need_w, need_b, need_pre = ctx.needs_input_grad[:4]  # type: ignore[attr-defined]
            grad_x = grad_W = grad_b = grad_pre = None
            if need_x:
                s_tok = code.by_token(g)
                with parallel():
                    grad_x = (s_tok @ W_enc.float().t()).to(x_dt)
            if need_w:
                s_lat = code.by_latent_t(g)
                with parallel():
                    grad_W = (s_lat @ xin).t()  # [d, d_sae] view of a [d_sae, d] product
            if need_b or need_pre:
                sums = code.latent_sums(g)  # [d_sae]
                grad_b = sums if need_b else None
                if need_pre:
                    grad_pre = -torch.mv(W_enc.float(), sums).to(pre_dt)  # [d]
        return grad_x, grad_W, grad_b, grad_pre, None, None, None, None, None, None


def topk_encode_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, cdt: torch.dtype, dead: Tensor | None = None,
                    k_aux: int = 0, b_pre: Tensor | None = None, workspace: dict[str, Tensor] | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, SparseCodeCSR]:
    """TopK code and the dead latents' AuxK code from one encoder matmul; see :class:`TopKEncodeCPU`. The last
    item is the TopK code's layout, for :func:`sparse_decode_cpu` when it decodes that code whole.

    ``workspace``: a dict kept by the caller across steps; the ``[N, d_sae]`` pre-activations are written into the
    buffer it holds instead of fresh memory (a fresh 400 MB block costs ~150 ms of page faults per step at
    768→24,576 fp32, batch 4,096, measured on one core).
    """
    layout: list[SparseCodeCSR] = []
    idx, val, aux_idx, aux_val = TopKEncodeCPU.apply(x, W_enc, b_enc, b_pre, k, cdt, dead, k_aux, layout, workspace)
    return idx, val, aux_idx, aux_val, layout[0]
