"""The SAE architectures: shapes, gradients, each architecture's defining property, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.sae import ARCHS, NoDictionaryError, SAEConfig, make_sae
from pipeline.sae.jumprelu import heaviside_ste, jumprelu
from pipeline.sae.kl import kl_sparsity
from pipeline.sae.ops import geometric_median

D_IN, D_SAE, K = 16, 48, 4
SPARSE = [a for a in ARCHS if a != "dense"]
# Architectures trained on one tensor (a transcoder trains on (input, target) pairs: tests/test_transcoder.py).
PLAIN = [a for a in ARCHS if a != "transcoder"]


def cfg_for(arch: str, **kw) -> SAEConfig:
    d_sae = 32 if arch == "dense" else D_SAE
    base = dict(arch=arch, d_in=D_IN, d_sae=d_sae, k=K, hidden_sizes=[64, 32, 64])
    return SAEConfig(**(base | kw))


def batch(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 3 + 1


def adam_steps(sae, n_steps: int, lr: float = 1e-2, seed: int = 0) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for s in range(n_steps):
        out = sae.training_loss(batch(64, seed + s), s, n_steps)
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return opt


def test_registry_has_all_architectures() -> None:
    assert set(ARCHS) == {"relu_l1", "topk", "batchtopk", "matryoshka_batchtopk", "transcoder", "jumprelu", "gated", "kl", "dense"}
    with pytest.raises(UserError, match=r"sae.arch: 'nope' is not an architecture \(allowed: batchtopk, dense, gated"):
        make_sae(SAEConfig(arch="nope", d_in=4, d_sae=8))  # checked where an SAE is built: the registry decides


@pytest.mark.parametrize("arch", PLAIN)
def test_shapes_and_gradients_flow(arch: str) -> None:
    sae = make_sae(cfg_for(arch), seed=0)
    x = batch(32)
    sae.init_from_data(batch(256, seed=1))
    x3 = x.view(4, 8, D_IN)  # leading dims are free
    assert sae.encode(x3).shape == (4, 8, sae.cfg.d_sae)
    assert sae.decode(sae.encode(x3)).shape == (4, 8, D_IN)
    assert sae(x).shape == (32, D_IN)
    out = sae.training_loss(x, 0, 10)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.x_hat.shape == (32, D_IN) and out.latents.shape == (32, sae.cfg.d_sae)
    assert all(v.ndim == 0 for v in out.terms.values()) and "mse" in out.terms and "l0" in out.terms
    out.loss.backward()
    for name, p in sae.named_parameters():
        if name == "log_threshold":
            continue  # only pre-activations within epsilon of theta give it a gradient; see the STE test
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{arch}: no gradient reaches {name}"
    if arch != "dense":
        assert (sae.encode(x) >= 0).all()  # feature activations are non-negative


@pytest.mark.parametrize("arch", PLAIN)
def test_training_loss_has_no_host_sync(arch: str) -> None:
    """On the meta device any .item()/bool()/int() of a tensor raises: the loss must not need one."""
    sae = make_sae(cfg_for(arch), seed=0).to("meta")
    dead = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device="meta")  # AuxK has work
    out = sae.training_loss(torch.empty(8, D_IN, device="meta"), 3, 10, dead)
    out.loss.backward()
    sae.before_optimizer_step()
    sae.after_optimizer_step()
    assert out.loss.device.type == "meta"


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_l0_is_k(arch: str) -> None:
    sae = make_sae(cfg_for(arch), seed=0).train()
    out = sae.training_loss(batch(64), 0, 10)
    per_token = (out.latents != 0).sum(-1)
    if arch == "topk":
        assert (per_token == K).all()  # exactly k per token
    else:
        assert per_token.float().mean().item() == K  # B·k over the batch, k on average
        assert per_token.min() != per_token.max()  # ...but not per token


def test_batchtopk_threshold_used_at_eval() -> None:
    sae = make_sae(cfg_for("batchtopk"), seed=0).train()
    assert sae.threshold.item() == -1.0  # not estimated yet
    out = sae.training_loss(batch(64), 0, 10)
    kept = out.latents[out.latents > 0]
    assert sae.threshold.item() == pytest.approx(kept.min().item())  # first batch: its smallest kept value
    sae.training_loss(batch(64, seed=1), 1, 10)
    theta = sae.threshold.item()
    sae.eval()
    x = batch(16, seed=2)
    f = sae.encode(x)
    pre = sae.pre_acts(sae.scale_in(x))
    assert torch.equal(f, pre.relu() * (pre > theta))
    assert torch.equal(sae.encode(x[:1])[0], f[0])  # a token's code no longer depends on its batch


def test_topk_auxk_reaches_dead_latents() -> None:
    sae = make_sae(cfg_for("topk"), seed=0)
    out = sae.training_loss(batch(64), 0, 10)
    assert out.terms["auxk"].item() == 0.0  # nothing dead (no mask given)
    sae.zero_grad()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:20] = True
    out = sae.training_loss(batch(64, seed=1), 1, 10, dead)  # the trainer's mask
    fired = (out.latents != 0).any(0)
    assert out.terms["auxk"].item() > 0
    out.loss.backward()
    still_dead = dead & ~fired
    assert still_dead.any()
    assert sae.W_enc.grad[:, still_dead].abs().sum() > 0  # only AuxK can move never-fired latents
    untouched = ~dead & ~fired
    assert sae.W_enc.grad[:, untouched].abs().sum() == 0  # AuxK reaches only the latents the mask names


def test_jumprelu_straight_through_hand_values() -> None:
    # theta = eps = 0.001. K((z - theta)/eps) = 1 iff |z - theta| < eps/2 = 0.0005: only z = 0.0012.
    z = torch.tensor([0.0012, 0.5, 0.0001], requires_grad=True)
    theta = torch.full((3,), 0.001, requires_grad=True)
    y = jumprelu(z, theta, 0.001)
    assert torch.allclose(y, torch.tensor([0.0012, 0.5, 0.0]))
    y.sum().backward()
    # d/dtheta: -(theta/eps)·K = -1 for the first entry, 0 elsewhere; d/dz = H(z - theta) = [1, 1, 0]
    assert torch.allclose(theta.grad, torch.tensor([-1.0, 0.0, 0.0]))
    assert torch.allclose(z.grad, torch.tensor([1.0, 1.0, 0.0]))
    z.grad = None
    theta.grad = None
    heaviside_ste(z, theta, 0.001).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-1000.0, 0.0, 0.0]))  # -(1/eps)·K
    assert torch.equal(z.grad, torch.zeros(3))  # no pseudo-gradient to z through H


def test_jumprelu_threshold_gets_gradient_in_sae() -> None:
    sae = make_sae(cfg_for("jumprelu", l1_warmup_steps=0), seed=0)
    with torch.no_grad():  # every pre-activation z = 0.0012, within eps/2 of theta = 0.001
        sae.W_enc.zero_()
        sae.b_enc.fill_(0.0012)
    out = sae.training_loss(batch(8), 0, 10)
    out.loss.backward()
    g = sae.log_threshold.grad
    assert g is not None and torch.isfinite(g).all() and (g != 0).all()


@pytest.mark.parametrize("arch,recipe", [("relu_l1", "2023"), ("topk", "2024"), ("jumprelu", "2024"), ("gated", "2024")])
def test_unit_norm_decoder_after_step(arch: str, recipe: str) -> None:
    sae = make_sae(cfg_for(arch, recipe=recipe), seed=0)
    out = sae.training_loss(batch(64), 0, 10)
    out.loss.backward()
    sae.before_optimizer_step()
    g = sae.W_dec.grad
    radial = (g * sae.W_dec).sum(-1)
    assert (radial.abs() <= 1e-5 * g.norm(dim=-1)).all()  # gradient parallel to each row removed
    assert g.abs().sum() > 0
    adam_steps(sae, 3, lr=0.1)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5)


def test_relu_l1_2024_recipe() -> None:
    sae = make_sae(cfg_for("relu_l1", recipe="2024", l1_coeff=2.0, l1_warmup_steps=10), seed=0)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))  # init norm 0.1
    assert torch.equal(sae.W_enc, sae.W_dec.t())  # encoder = decoder transpose
    assert not sae.apply_b_dec
    adam_steps(sae, 3, lr=0.05)
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))  # unconstrained
    x = batch(32)
    out = sae.training_loss(x, 4, 100)  # warm-up factor (4+1)/10 = 0.5
    f = out.latents
    l1 = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()  # penalty weighted by decoder row norms
    assert out.terms["l1"].item() == pytest.approx(l1.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out.terms["mse"].item() + 2.0 * 0.5 * l1.item(), rel=1e-5)


def test_relu_l1_2023_resampling() -> None:
    sae = make_sae(cfg_for("relu_l1", recipe="2023"), seed=0)
    sae.init_from_data(batch(256, seed=5))
    opt = adam_steps(sae, 2)
    assert sae.wants_resample(25_000) and not sae.wants_resample(125_000) and not sae.wants_resample(1)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()
    torch.manual_seed(0)
    assert sae.resample_dead(batch(512, seed=6), opt, dead).tolist() == [1, 5, 7]
    assert torch.allclose(sae.W_dec[dead].norm(dim=-1), torch.ones(3))
    assert torch.allclose(sae.W_enc[:, dead].norm(dim=0), torch.full((3,), 0.2 * alive_norm.item()))
    assert torch.allclose(sae.W_enc[:, dead].t(), sae.W_dec[dead] * 0.2 * alive_norm)  # same direction
    assert (sae.b_enc[dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][~dead] != 0).any()
    with pytest.raises(UserError):
        make_sae(cfg_for("topk")).resample_dead(batch(8), opt, dead)


def test_kl_penalty_hand_check() -> None:
    # rho = 0.1, rho_hat = [0.2, 0.1]:
    # KL(0.1||0.2) = 0.1 ln(0.1/0.2) + 0.9 ln(0.9/0.8) = -0.0693147 + 0.1060047 = 0.0366900; KL(0.1||0.1) = 0
    assert kl_sparsity(0.1, torch.tensor([0.2, 0.1])).item() == pytest.approx(0.0366900, abs=1e-6)
    sae = make_sae(cfg_for("kl", target_rate=0.1, kl_coeff=2.0), seed=0)
    out = sae.training_loss(batch(32), 0, 10)
    rho_hat = out.latents.mean(0)
    expected = (0.1 * torch.log(0.1 / rho_hat) + 0.9 * torch.log(0.9 / (1 - rho_hat))).sum()
    assert out.terms["kl"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.terms["mse"].item() + 2.0 * expected.item(), rel=1e-5)
    assert ((out.latents > 0) & (out.latents < 1)).all()  # sigmoid units


def test_dense_has_no_dictionary() -> None:
    sae = make_sae(SAEConfig(arch="dense", d_in=D_IN, d_sae=32), seed=0)  # default 128 -> 32 -> 128
    widths = [m.out_features for m in [*sae.encoder, *sae.decoder] if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 32, 128, D_IN]
    assert not sae.has_dictionary
    with pytest.raises(NoDictionaryError, match="no dictionary"):
        sae.feature_directions()
    with pytest.raises(NoDictionaryError):
        _ = sae.W_dec
    with pytest.raises(UserError, match="bottleneck"):
        SAEConfig(arch="dense", d_in=D_IN, d_sae=48)


def test_init_from_data_scaling_and_median() -> None:
    sae = make_sae(cfg_for("topk"), seed=0)
    x = batch(512)
    sae.init_from_data(x)
    s = sae.cfg.scaling_factor
    assert (x * s).pow(2).sum(-1).mean().item() == pytest.approx(D_IN, rel=1e-5)  # E||s x||^2 = d_in
    assert torch.allclose(sae.b_dec, geometric_median(x * s).float())
    # Geometric median of three points at the origin and one outlier is the origin (the mean is not).
    pts = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [100.0, 100.0]])
    assert geometric_median(pts).abs().max() < 1e-3


@pytest.mark.parametrize("arch", PLAIN)
def test_fold_scaling_keeps_function(arch: str) -> None:
    sae = make_sae(cfg_for(arch, scaling_factor=0.37), seed=0)
    adam_steps(sae, 2)
    sae.eval()
    x = batch(16, seed=3)
    f, x_hat = sae.encode(x), sae(x)
    sae.fold_scaling()
    assert sae.cfg.scaling_factor == 1.0
    assert torch.allclose(sae.encode(x), f, atol=1e-5) and torch.allclose(sae(x), x_hat, atol=1e-4)


@pytest.mark.parametrize("arch", PLAIN)
def test_same_seed_is_bit_for_bit(arch: str) -> None:
    def run() -> dict[str, torch.Tensor]:
        sae = make_sae(cfg_for(arch), seed=123)
        sae.init_from_data(batch(128, seed=9))
        adam_steps(sae, 3)
        return {k: v.clone() for k, v in sae.state_dict().items()}

    a, b = run(), run()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = make_sae(cfg_for(arch), seed=124).state_dict()
    assert any(not torch.equal(a0, c[k]) for k, a0 in make_sae(cfg_for(arch), seed=123).state_dict().items()
               if a0.is_floating_point() and a0.numel() > 1)


def test_warmup_defaults_to_five_percent() -> None:
    sae = make_sae(cfg_for("relu_l1"), seed=0)
    assert sae._warmup(0, 1000) == pytest.approx(1 / 50) and sae._warmup(49, 1000) == 1.0
    assert math.isclose(sae._warmup(24, 1000), 0.5)


def test_config_from_params() -> None:
    from pipeline.params.sae import SAEParams
    from pipeline.sae import config_from_params

    cfg = config_from_params(SAEParams(arch="topk", expansion=4, k=7), 16, "layers.2.resid_post")
    assert (cfg.arch, cfg.d_in, cfg.d_sae, cfg.k, cfg.hook) == ("topk", 16, 64, 7, "layers.2.resid_post")
    dense = config_from_params(SAEParams(arch="dense", hidden_sizes=[64, 8, 64]), 16)
    assert dense.d_sae == 8 and make_sae(dense).encode(batch(2)).shape == (2, 8)
    kl = config_from_params(SAEParams(arch="kl", target_rate=0.02, kl_coeff=0.5, resample_every=7), 16)
    assert (kl.target_rate, kl.kl_coeff, kl.resample_every) == (0.02, 0.5, 7)


def test_every_sae_knob_reaches_the_config() -> None:
    # One definition per knob: SAEParams and SAEConfig share SAEKnobs, and config_from_params copies each of them
    # (a knob added to SAEKnobs needs no other edit to reach the built SAE).
    import dataclasses

    from pipeline.params.sae import SAEKnobs, SAEParams
    from pipeline.sae import config_from_params

    changed = {"arch": "relu_l1", "k": 3, "recipe": "2023", "l1_coeff": 0.7, "l1_warmup_steps": 9, "resample_every": 11,
               "l0_coeff": 0.3, "jumprelu_bandwidth": 0.02, "jumprelu_init_threshold": 0.04, "aux_coeff": 0.5,
               "k_aux": 5, "target_rate": 0.2, "kl_coeff": 0.9, "hidden_sizes": [40, 20, 40],
               "matryoshka_fractions": [0.5, 0.5], "matryoshka_weighting": "saelens", "matryoshka_auxk": "per_level",
               "skip": True, "transcoder_activation": "batchtopk"}
    assert set(changed) == {f.name for f in dataclasses.fields(SAEKnobs)}
    # Besides the knobs: the width, and where the SAE comes from (trained here or imported), which build nothing.
    assert {f.name for f in dataclasses.fields(SAEParams)} - set(changed) == {"expansion", "source", "source_format"}
    cfg = config_from_params(SAEParams(**changed, expansion=2), 16, "h")
    assert {k: getattr(cfg, k) for k in changed} == changed and cfg.d_sae == 32
