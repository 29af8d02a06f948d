"""Tensor operations shared by the architectures: decoder-norm constraint, TopK, AuxK, geometric median."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from pipeline.sae import batch

Backend = Literal["auto", "triton", "torch"]


def _use_triton(W: Tensor, backend: Backend) -> bool:
    """``auto``: the fused kernel on CUDA when Triton is usable, else the PyTorch code (CPU stays bit-identical).

    ``triton`` forces the kernels (on CPU only under ``TRITON_INTERPRET=1``: tests), ``torch`` the PyTorch code.
    """
    if backend == "torch" or (backend == "auto" and W.device.type != "cuda"):
        return False  # no Triton import, no probing: the CPU path is the plain code below
    from pipeline.kernels.dispatch import resolve_backend  # lazy: `import pipeline.sae` never needs Triton

    return resolve_backend(backend, W.device) == "triton"


@torch.no_grad()
def normalize_rows_(W: Tensor, *, backend: Backend = "auto") -> None:
    """Rescale each row of ``W[d_sae, d_in]`` to unit L2 norm, in place.

    On CUDA (``backend="auto"``) this is one fused pass per row
    (:func:`pipeline.kernels.decoder_norm.normalize_rows_triton_`), same formula.
    """
    eps = torch.finfo(W.dtype).eps
    if _use_triton(W, backend):
        from pipeline.kernels.decoder_norm import normalize_rows_triton_

        normalize_rows_triton_(W, eps)
        return
    W.div_(W.norm(dim=-1, keepdim=True).clamp_min(eps))


@torch.no_grad()
def remove_parallel_grad_(W: torch.nn.Parameter, *, backend: Backend = "auto") -> None:
    """Remove from ``W.grad`` the component parallel to each (unit-norm) row of ``W[d_sae, d_in]``.

    With rows on the unit sphere, only the tangential part of the gradient changes the direction;
    the radial part would be undone by renormalisation and distorts Adam's moment estimates
    (Towards Monosemanticity, 2023; Gao et al. 2024, "Preventing dead latents").
    On CUDA (``backend="auto"``) this is one fused pass per row
    (:func:`pipeline.kernels.decoder_norm.project_out_parallel_`), same formula.
    """
    assert W.grad is not None
    if _use_triton(W, backend):
        from pipeline.kernels.decoder_norm import project_out_parallel_

        project_out_parallel_(W, W.grad)
        return
    along = torch.linalg.vecdot(W.grad, W)  # [d_sae]; with addcmul_: two passes, no [d_sae, d_in] temporaries
    W.grad.addcmul_(W, along.unsqueeze(1), value=-1)


def topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest pre-activations per row, ReLU them, zero the rest. ``pre[..., d_sae]``.

    Gao et al. 2024, "TopK activation function": z = ReLU(TopK(W_enc(x - b_pre))). L0 <= k (== k unless fewer than k
    pre-activations are positive). Gradients flow to the selected entries only.
    """
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def normalized_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Gao et al. 2024's normalised MSE of ``pred[B, d]`` against ``target[B, d]``, in float32. Scalar.

    sum_n ||target_n - pred_n||^2 / sum_n ||target_n - mean_batch(target)||^2: the squared error over the target's
    variance around its batch mean (their code: ``normalized_mse`` in openai/sparse_autoencoder ``kernels.py``), so
    scaling both by c leaves it unchanged. A target without variance across the batch (one token, an all-zero
    residual, or a constant one up to float32 rounding: variance <= eps·E||target||^2) has nothing to normalise
    by; the value is then 0, where the ratio would be 0/0 or rounding noise blown up (Gao et al. use
    ``nan_to_num(0)``). Branch-free (``torch.where``): no host sync, and no NaN reaches the gradient.
    """
    pred, target = pred.float(), target.float()
    if target.requires_grad and batch.world() > 1:  # the one-collective variance below is detached
        err = batch.mean((target - pred).pow(2).sum(-1))
        var = batch.mean((target - batch.mean(target)).pow(2).sum(-1))
        sq = batch.mean(target.pow(2).sum(-1))
    else:  # means over the global batch when data-parallel, all in one collective
        (err, sq), (var,) = batch.moments(grad=[(target - pred).pow(2).sum(-1), target.pow(2).sum(-1)],
                                          spread=[target])
    ok = var > torch.finfo(torch.float32).eps * sq
    return torch.where(ok, err / torch.where(ok, var, torch.ones_like(var)), torch.zeros_like(err))


def total_variance(x: Tensor) -> Tensor:
    """sum_d Var_batch(x[:, d]) of ``x[B, d]``, detached, float32: E_n ||x_n - mean_batch(x)||^2. Scalar."""
    return batch.moments(spread=[x.detach().float()])[1][0]  # one collective when data-parallel


def auxk_loss(pre: Tensor, residual: Tensor, W_dec: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK loss (Gao et al. 2024, "Preventing dead latents" and appendix A.2): dead latents reconstruct the main model's residual.

    ``pre[B, d_sae]`` pre-activations, ``residual[B, d_in]`` = e = x - x_hat (detached), ``dead[d_sae]``
    bool. The top ``k_aux`` pre-activations among dead latents decode (without bias) to e_hat and
    the loss is ``normalized_mse(e_hat, e)``: the squared error over e's variance around its batch mean, as in
    Gao et al.'s code, so the term does not fade as the SAE improves and e shrinks. A fixed ``k_aux`` and a
    mask instead of ``min(k_aux, n_dead)`` keeps the shapes static: no host sync. Zero when no
    latent is dead.
    """
    masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
    vals, idx = masked.topk(k_aux, dim=-1, sorted=False)  # [B, k_aux]
    vals = torch.where(dead[idx], vals, torch.zeros_like(vals)).relu()  # live picks (-inf) -> 0
    acts = torch.zeros_like(pre).scatter(-1, idx, vals)
    e_hat = acts @ W_dec  # [B, d_in]
    return normalized_mse(e_hat, residual.detach()) * dead.any().float()


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-7) -> Tensor:
    """Geometric median of the rows of ``x[N, d]`` by Weiszfeld's algorithm, in float64.

    The point minimising the sum of Euclidean distances; robust to outliers, which is why
    Towards Monosemanticity initialises the pre-encoder bias there.
    """
    x = x.to(torch.float64)
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-12)  # [N]
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * (1.0 + y.norm()):
            return y_new
        y = y_new
    return y
