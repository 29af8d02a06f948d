"""Matryoshka BatchTopK: nested groups, the level losses by hand, AuxK scopes, the config's checks, SAELens export
read by the real sae-lens package, and a planted feature hierarchy it recovers with less absorption than BatchTopK."""

from __future__ import annotations

import pytest
import torch
from sae_fit import fit

from pipeline.errors import UserError
from pipeline.sae import SAEConfig, export_saelens, import_saelens, make_sae
from pipeline.sae.matryoshka import group_sizes

SHARES3 = [0.25, 0.25, 0.5]  # d_sae 4 -> groups {0}, {1}, {2, 3}; levels end at latents 1, 2, 4


def test_group_sizes_follow_dictionary_learning() -> None:
    default = SAEConfig(arch="matryoshka_batchtopk", d_in=576, d_sae=4608).matryoshka_fractions
    assert group_sizes(default, 4608) == [144, 288, 576, 1152, 2448]  # SAEBench's 1/32, 1/16, 1/8, 1/4, rest
    assert group_sizes(default, 64) == [2, 4, 8, 16, 34]
    sae = make_sae(SAEConfig(arch="matryoshka_batchtopk", d_in=4, d_sae=64, k=2), seed=0)
    assert sae.ends == [2, 6, 14, 30, 64]


def hand_sae(weighting: str, auxk: str = "full"):
    """d_in 2, d_sae 4: on x = [3, 4] the latents are f = [1, 2, 0.5, 0] and W_dec's rows are chosen by hand."""
    cfg = SAEConfig(arch="matryoshka_batchtopk", d_in=2, d_sae=4, k=4, matryoshka_fractions=SHARES3,
                    matryoshka_weighting=weighting, matryoshka_auxk=auxk)
    sae = make_sae(cfg, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1 / 3, 0.0, 1 / 6, -1.0], [0.0, 0.5, 0.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [5.0, 5.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("weighting,expected", [
    # Levels: x_hat_1 = 1·[3, 0] -> L_1 = ||[0, 4]||^2 = 16; x_hat_2 = [3, 2] -> L_2 = 4; x_hat_3 = [3, 3] -> L_3 = 1;
    # the empty level x_hat_0 = b_dec = 0 -> L_0 = 25. (One token: AuxK's weight, TV(x), is 0.)
    ("dictionary_learning", (16 + 4 + 1) / 9), ("bussmann", (25 + 16 + 4 + 1) / 4), ("saelens", 16 + 4 + 1)])
def test_level_losses_by_hand(weighting: str, expected: float) -> None:
    sae = hand_sae(weighting)
    out = sae.training_loss(torch.tensor([[3.0, 4.0]]), 0, 10)
    torch.testing.assert_close(out.latents, torch.tensor([[1.0, 2.0, 0.5, 0.0]]))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.terms["mse"].item() == pytest.approx(1.0) and out.terms["mse_level1"].item() == pytest.approx(16.0)
    assert out.terms["mse_level2"].item() == pytest.approx(4.0)
    torch.testing.assert_close(out.x_hat, torch.tensor([[3.0, 3.0]]))  # the full level is the SAE's output
    loss_grad = torch.autograd.grad(out.loss, sae.W_dec)[0]
    assert loss_grad[0].abs().sum() > 0 and loss_grad[3].abs().sum() == 0  # latent 3 is off: no gradient


def test_auxk_scope_per_level_uses_the_level_residual() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g) * 2 + 1
    kw = dict(arch="matryoshka_batchtopk", d_in=8, d_sae=32, k=2, matryoshka_fractions=[0.25, 0.75], k_aux=4)
    full, per = (make_sae(SAEConfig(**kw, matryoshka_auxk=s), seed=1) for s in ("full", "per_level"))
    dead_last = torch.zeros(32, dtype=torch.bool)
    dead_last[8:] = True  # dead latents in the outer group only: its level is the full one, the scopes agree
    a, b = (s.training_loss(x, 0, 10, dead_last).terms["auxk"] for s in (full, per))
    assert a > 0 and a.item() == pytest.approx(b.item(), rel=1e-6)
    dead_first = torch.zeros(32, dtype=torch.bool)
    dead_first[:4] = True  # dead latents in the inner group: per_level fits level 1's (larger) residual
    a, b = (s.training_loss(x, 0, 10, dead_first).terms["auxk"] for s in (full, per))
    assert a > 0 and b > 0 and abs(a.item() - b.item()) > 1e-3


def test_config_rejects_bad_groups() -> None:
    base = dict(arch="matryoshka_batchtopk", d_in=4, d_sae=16, k=2)
    with pytest.raises(UserError, match="matryoshka_fractions: .* summing to 1"):
        SAEConfig(**base, matryoshka_fractions=[0.5, 0.25])
    with pytest.raises(UserError, match="leaves an empty group at d_sae=16"):
        SAEConfig(**base, matryoshka_fractions=[0.01, 0.99])
    with pytest.raises(UserError, match="matryoshka_weighting: 'mean' is not allowed"):
        SAEConfig(**base | {"d_sae": 64}, matryoshka_weighting="mean")


def trained(arch: str, x_of, steps: int, **kw):
    cfg = SAEConfig(arch=arch, **kw)
    sae = make_sae(cfg, seed=0)
    sae.init_from_data(x_of(4096, 10_000))
    return fit(sae, lambda s: (x_of(256, s), None), steps, lr=3e-3)


def test_saelens_export_loads_in_sae_lens(tmp_path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    g = torch.Generator().manual_seed(2)
    sae = trained("matryoshka_batchtopk", lambda n, s: torch.randn(n, 8, generator=g).relu() * 2, 30,
                  d_in=8, d_sae=32, k=3, matryoshka_fractions=[0.25, 0.75], hook="layers.1.resid_post")
    assert sae.threshold > 0
    export_saelens(sae, tmp_path / "lens", model_name="tiny")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "lens")
    assert type(theirs).__name__ == "JumpReLUSAE"  # as SAELens saves its own Matryoshka SAEs
    x = torch.randn(64, 8, generator=g).relu() * 2
    ours = import_saelens(tmp_path / "lens")  # the same file read back: the input scaling folded into the weights
    with torch.no_grad():
        f = ours.encode(x)
        assert (f != 0).any()
        torch.testing.assert_close(theirs.encode(x), f, rtol=0, atol=0)  # the same function, bit for bit
        torch.testing.assert_close(theirs.decode(f), ours.decode(f), rtol=0, atol=0)
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)  # the trained SAE, up to the folding


# The planted hierarchy: 8 parent features, each with 4 children that only fire with it (a parent active on 15% of
# tokens, then one of its children on 80% of those), 40 orthogonal-ish random directions in 32 dimensions,
# magnitudes U(0.5, 1.5). True L0 ~1.2 parents + ~1.0 children; the SAEs get k = 2 and 64 latents, so a latent for
# "parent + child i" (absorption: the parent's own latent stays off when a child fires) saves L0.
H_D, H_PARENTS, H_CHILDREN = 32, 8, 4


def hierarchy(seed: int):
    g = torch.Generator().manual_seed(seed)
    n_feat = H_PARENTS * (1 + H_CHILDREN)
    dirs = torch.randn(n_feat, H_D, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)  # [40, 32]: parents first

    def x_of(n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        gg = torch.Generator().manual_seed(1000 + s)
        parent = torch.rand(n, H_PARENTS, generator=gg) < 0.15
        which = torch.nn.functional.one_hot(torch.randint(0, H_CHILDREN, (n, H_PARENTS), generator=gg), H_CHILDREN)
        child = which.bool() & parent[:, :, None] & (torch.rand(n, H_PARENTS, 1, generator=gg) < 0.8)
        on = torch.cat([parent, child.reshape(n, -1)], 1).float()
        return (on * (0.5 + torch.rand(n, n_feat, generator=gg))) @ dirs, parent

    return dirs[:H_PARENTS], x_of


def parent_recall(sae, parents: torch.Tensor, x_of) -> float:
    """Mean over parents of how often the latent whose decoder row is closest to the parent fires when the parent
    is active (1 - absorption, measured directly)."""
    x, parent = x_of(8192, 55_555)
    with torch.no_grad():
        fires = sae.encode(x) > 0
    best = (parents @ sae.feature_directions().T).argmax(1)
    return torch.stack([fires[parent[:, p], best[p]].float().mean() for p in range(H_PARENTS)]).mean().item()


def test_planted_hierarchy_matryoshka_absorbs_less_than_batchtopk() -> None:
    torch.set_num_threads(1)
    parents, x_of = hierarchy(seed=1)
    kw = dict(d_in=H_D, d_sae=64, k=2)
    flat = trained("batchtopk", lambda n, s: x_of(n, s)[0], 600, **kw)
    nested = trained("matryoshka_batchtopk", lambda n, s: x_of(n, s)[0], 600, matryoshka_fractions=[0.25, 0.75], **kw)
    r_flat, r_nested = parent_recall(flat, parents, x_of), parent_recall(nested, parents, x_of)
    # Measured (hierarchy seeds 0, 1, 2): batchtopk 0.79, 0.68, 0.73; matryoshka 0.86, 0.91, 0.97 (same width, k, steps).
    assert r_nested >= 0.85 and r_flat <= 0.8 and r_nested - r_flat >= 0.1, (r_nested, r_flat)
