"""The CPU sparse training step (``train.kernels: sparse``, the CPU's 'auto'): the dense step's numbers, repeatable."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.errors import UserError
from pipeline.kernels.cpu_sparse import sparse_decode_cpu, topk_encode_cpu
from pipeline.sae import SAEConfig, make_sae
from pipeline.train_setup import kernel_backend

D, D_SAE, K, B = 16, 64, 4, 48
DEAD = {"none": None, "some": torch.arange(D_SAE) % 3 == 0, "all": torch.ones(D_SAE, dtype=torch.bool)}


def _pair(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = make_sae(SAEConfig(arch=arch, d_in=D, d_sae=D_SAE, k=K, k_aux=8), seed=1)
    with torch.no_grad():  # off the init (encoder = decoder transpose, zero biases): every gradient path counts
        g = torch.Generator().manual_seed(2)
        for p in dense.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        dense.cfg.scaling_factor = 1.3
    sparse = copy.deepcopy(dense)
    sparse.kernel_backend = "sparse"
    return dense, sparse


@pytest.mark.parametrize("dead", list(DEAD))
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_step_matches_dense_fp32(arch: str, dead: str) -> None:
    # "all" dead puts every TopK latent in the AuxK code too: the backward sums a latent's two entries per token
    dense, sparse = _pair(arch)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    outs = [m.training_loss(x, 5, 100, DEAD[dead]) for m in (dense, sparse)]
    for o in outs:
        o.loss.backward()
    od, osp = outs
    assert osp.latents is None and osp.code is not None  # no dense [B, d_sae] code
    torch.testing.assert_close(osp.x_hat, od.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(osp.loss, od.loss, rtol=1e-5, atol=1e-6)
    for name in ("mse", "l0", "auxk"):
        torch.testing.assert_close(osp.terms[name], od.terms[name], rtol=1e-5, atol=1e-6)
    assert (od.terms["auxk"] > 0) == (dead != "none")
    torch.testing.assert_close(osp.firing(D_SAE)[0], od.firing(D_SAE)[0])
    for (name, pd), ps in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert pd.grad is not None and ps.grad is not None, name
        torch.testing.assert_close(ps.grad, pd.grad, rtol=1e-5, atol=1e-6, msg=name)
    if arch == "batchtopk":
        torch.testing.assert_close(sparse.threshold, dense.threshold)  # the EMA sees the same kept values


def test_sparse_step_close_to_dense_under_bf16_autocast() -> None:
    dense, sparse = _pair("topk")
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (dense, sparse):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.training_loss(x, 5, 100, DEAD["some"])
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=3e-2, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(sparse.W_enc.grad.flatten(), dense.W_enc.grad.flatten(), dim=0)
    assert cos > 0.98


def _train(steps: int) -> dict[str, torch.Tensor]:
    _, sae = _pair("topk")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(4)
    for step in range(steps):
        out = sae.training_loss(torch.randn(B, D, generator=g), step, steps, DEAD["some"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return {k: v.clone() for k, v in sae.state_dict().items()}


def test_two_seeded_runs_are_bit_identical() -> None:
    a, b = _train(6), _train(6)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sparse_products_do_not_depend_on_the_thread_count() -> None:
    # Each latent's sum over its tokens runs in one thread in token order; the dense encoder matmul is outside this.
    g = torch.Generator().manual_seed(5)
    N, d, n = 512, 32, 1024
    x, W_enc = torch.randn(N, d, generator=g), torch.randn(d, n, generator=g, requires_grad=True)
    b_enc, b_pre = torch.zeros(n, requires_grad=True), torch.zeros(d, requires_grad=True)
    W_dec, b_dec = torch.randn(n, d, generator=g, requires_grad=True), torch.zeros(d, requires_grad=True)
    dead = torch.arange(n) % 2 == 0
    target = torch.randn(N, d, generator=g)

    def grads(threads: int) -> list[torch.Tensor]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            idx, val, aux_idx, aux_val, layout = topk_encode_cpu(x, W_enc, b_enc, 16, torch.float32, dead, 24, b_pre)
            y = sparse_decode_cpu(idx, val, W_dec, b_dec, layout) + sparse_decode_cpu(aux_idx, aux_val, W_dec, b_dec)
            return list(torch.autograd.grad((y - target).pow(2).sum(), [W_enc, b_enc, b_pre, W_dec, b_dec]))
        finally:
            torch.set_num_threads(before)

    for one, many in zip(grads(1), grads(4), strict=True):
        assert torch.equal(one, many)


def test_auto_picks_the_sparse_step_on_cpu_for_topk_archs() -> None:
    cpu = torch.device("cpu")
    assert kernel_backend("auto", "topk", cpu) == "sparse"
    assert kernel_backend("auto", "batchtopk", cpu) == "sparse"
    assert kernel_backend("torch", "topk", cpu) == "torch"  # the dense step on request
    assert kernel_backend("auto", "relu_l1", cpu) == "torch"
    with pytest.raises(UserError, match="train.kernels: 'sparse' supports sae.arch topk and batchtopk"):
        kernel_backend("sparse", "relu_l1", cpu)
