"""AuxK as in Gao et al. 2024 (appendix A.2, openai/sparse_autoencoder train.py): a normalised MSE of the residual.

Their objective is mse_scale·mse(x_hat, x) + alpha·normalized_mse(e_hat, e), with normalized_mse the squared error
over the target's variance around its batch mean. The kernel path computes the same term (tests/test_kernels.py
checks that the two paths agree on loss, terms and gradients).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.sae import SAEConfig, make_sae
from pipeline.sae.ops import auxk_loss, normalized_mse

D_IN, D_SAE, K = 16, 48, 4

# pre [B=2, d_sae=3]; latents 0 and 2 dead; W_dec [3, d=2]; residual e [2, 2].
PRE = torch.tensor([[1.0, 2.0, -1.0], [0.5, 3.0, 2.0]])
DEAD = torch.tensor([True, False, True])
W_DEC = torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 1.0]])
E = torch.tensor([[2.0, 0.0], [2.0, 4.0]])


def test_normalized_mse_hand_values() -> None:
    # e - mean_batch(e) = [[0, -2], [0, 2]]: variance 4 per token; error of predicting 0: (4 + 20) / 2 = 12.
    assert normalized_mse(torch.zeros(2, 2), E).item() == pytest.approx(12 / 4)
    assert normalized_mse(E, E).item() == 0.0
    # Gao et al.'s form, means over elements: mse(pred, e) / mse(mean_batch(e), e).
    pred = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    gao = (pred - E).pow(2).mean() / (E.mean(0) - E).pow(2).mean()
    assert normalized_mse(pred, E).item() == pytest.approx(gao.item())
    # No variance across the batch: documented as 0 (not 0/0, not rounding noise over a tiny variance).
    assert normalized_mse(torch.zeros(1, 2), E[:1]).item() == 0.0  # one token
    const = torch.full((3, 2), 0.1)
    assert normalized_mse(torch.zeros(3, 2), const).item() == 0.0  # 0.1 is not exact in float32: var ~1e-17
    assert normalized_mse(torch.ones(3, 2), torch.zeros(3, 2)).item() == 0.0


def test_auxk_loss_hand_value() -> None:
    # k_aux = 1: token 0 picks dead latent 0 (1.0 > -1.0), token 1 dead latent 2 (2.0 > 0.5); live latent 1 never.
    # e_hat = [[1, 0], [2, 2]]; ||e - e_hat||^2 = [1, 4] -> 2.5; variance of e around its batch mean = 4.
    assert auxk_loss(PRE, E, W_DEC, DEAD, 1).item() == pytest.approx(2.5 / 4)
    # k_aux = 3 > n_dead: the live pick is masked to 0; token 1 adds 0.5 · W_dec[0]: e_hat[1] = [2.5, 2].
    assert auxk_loss(PRE, E, W_DEC, DEAD, 3).item() == pytest.approx((1 + 4.25) / 2 / 4)
    assert auxk_loss(PRE, E, W_DEC, torch.zeros(3, dtype=torch.bool), 1).item() == 0.0  # nothing dead


def test_auxk_loss_is_unchanged_when_the_residual_scales() -> None:
    # e -> 2e with the pre-activations (hence e_hat) doubled: the raw squared error would grow 4x.
    assert auxk_loss(2 * PRE, 2 * E, W_DEC, DEAD, 1).item() == pytest.approx(auxk_loss(PRE, E, W_DEC, DEAD, 1).item())


SAE_DEAD = torch.arange(D_SAE) < 20  # [d_sae]: 20 dead latents (the trainer's mask): AuxK has work


def _dead_sae(arch: str):
    return make_sae(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K), seed=0).train()


def _x(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(0)) * 3 + 1


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sae_auxk_term_is_scale_free(arch: str) -> None:
    # b_dec = b_enc = 0 at init and scaling_factor = 1: doubling x doubles pre-activations, x_hat, e and e_hat.
    terms = []
    for c in (1.0, 2.0):
        out = _dead_sae(arch).training_loss(c * _x(), 0, 10, SAE_DEAD)
        terms.append(out.terms)
    assert terms[0]["auxk"] > 0
    assert terms[1]["auxk"].item() == pytest.approx(terms[0]["auxk"].item(), rel=1e-5)
    assert terms[1]["mse"].item() == pytest.approx(4 * terms[0]["mse"].item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sae_loss_is_gaos_objective_times_the_data_variance(arch: str) -> None:
    sae = _dead_sae(arch)
    x = _x()
    sae.init_from_data(_x(256) + 0.5)  # a real scaling factor and b_pre
    dead = SAE_DEAD
    out = sae.training_loss(x, 0, 10, dead)
    # Independently: Gao et al.'s train.py loss on the scaled batch, means over elements.
    xs = x * sae.cfg.scaling_factor
    xs_hat = out.x_hat * sae.cfg.scaling_factor
    mse_scale = 1 / (xs.mean(0) - xs).pow(2).mean()
    e = (xs - xs_hat).detach()
    pre = sae.pre_acts(xs).detach()
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(sae.k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ sae.W_dec.detach()
    aux = (e_hat - e).pow(2).mean() / (e.mean(0) - e).pow(2).mean()
    gao = mse_scale * (xs_hat - xs).pow(2).mean() + sae.cfg.aux_coeff * aux
    assert out.terms["auxk"].item() == pytest.approx(aux.item(), rel=1e-5)
    total_var = (xs - xs.mean(0)).pow(2).sum(-1).mean()  # the positive constant between the two objectives
    assert out.loss.item() == pytest.approx((gao * total_var).item(), rel=1e-5)


def test_one_token_batch_has_zero_auxk_and_finite_gradients() -> None:
    sae = _dead_sae("topk")
    out = sae.training_loss(_x(1), 0, 10, SAE_DEAD)
    out.loss.backward()
    assert out.terms["auxk"].item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)
