"""Do the SAEs recover a known dictionary? Toy model of superposition with a planted ground truth.

Synthetic activations (Elhage et al. 2022, "Toy Models of Superposition"; Sharkey et al. 2022,
"Taking features out of superposition with sparse autoencoders"): 64 true features, random unit
directions in d = 32 dimensions (overcomplete: more features than dimensions), each active
independently with probability 3/64 (~3 per sample, so a true feature fires on ~4.7% of samples) with
magnitude U(0.5, 1.5), so x = sum_i c_i D_i with sparse non-negative codes c. Each SAE has d_sae = 128
latents and is trained by a plain Adam loop written here (the pipeline's trainer is tested elsewhere) on
300 fresh batches of 256 samples. Scored on 4096 held-out samples, with *live* latents those firing on at
least 1% of them (the surplus latents of the 2x dictionary fire on < 0.5% while they die out):

- recovered: share of true features with a live latent whose decoder row has cosine > 0.9 with it;
- matched (the reverse): share of live latents whose decoder row has cosine > 0.9 with some true feature;
- fvu@2 of the reconstruction, and L0 where the architecture does not fix it (see ``CASES``).

A random 128-direction dictionary scores 0 on both shares. Bounds are the values measured for seeds 0-3
with margin (worst seen, sparse archs: recovered 0.98, matched 0.91; per-case numbers in ``CASES``); the runs are
seeded. Two cases need a mechanism a weaker test would not notice: dead latents revived by AuxK
(``test_auxk_revives_dead_latents``:
without AuxK, recovered 0.02), and relu_l1's L1 weighted by decoder norms (the ``init_decoder_norm=0.01``
case: unweighted, recovered 0.0). ~1 s per SAE with one torch thread: the file ran in 9-12 s on the shared
2-core dev box under load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from pipeline.metrics import fvu, max_cosine_similarity
from pipeline.sae import SAE, SAEConfig, make_sae
from pipeline.trainstats import LatentTracker

D, N_FEATURES, P_ACTIVE, D_SAE = 32, 64, 3 / 64, 128
STEPS, BATCH, LR = 300, 256, 1e-2
COS, LIVE_RATE = 0.9, 0.01


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matmuls run on one thread


def sample(n: int, dictionary: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``n`` activations ``[n, D]`` with sparse non-negative codes over ``dictionary[N_FEATURES, D]``."""
    active = torch.rand(n, N_FEATURES, generator=gen) < P_ACTIVE
    magnitude = torch.rand(n, N_FEATURES, generator=gen) + 0.5
    return (active * magnitude) @ dictionary


@dataclass
class Score:
    recovered: float  # share of true features matched by a live latent
    matched: float  # share of live latents matching a true feature
    fvu: float  # fvu@2 on held-out samples
    l0: float  # mean active latents per held-out sample
    n_live: int


def score(true: torch.Tensor, directions: torch.Tensor, live: torch.Tensor) -> tuple[float, float]:
    """(recovered, matched) of unit ``directions[d_sae, D]`` against ``true[N_FEATURES, D]``; ``live[d_sae]`` bool."""
    W = directions[live]
    if W.shape[0] == 0:
        return 0.0, 0.0
    recovered = (max_cosine_similarity(true, W) > COS).double().mean().item()
    matched = (max_cosine_similarity(W, true) > COS).double().mean().item()
    return recovered, matched


def train_and_score(cfg: SAEConfig, n_alive_at_init: int | None = None,
                    dead_window: int = 10_000_000) -> tuple[Score, SAE, torch.Tensor]:
    """Train ``cfg`` on the planted dictionary; ``n_alive_at_init``: all encoder columns but the first n shrunk
    100x after the (tied) init, so those latents never win a TopK slot: dead until something revives them.
    Returns the score, the SAE and the latents of the first training batch."""
    gen = torch.Generator().manual_seed(0)
    true = torch.randn(N_FEATURES, D, generator=gen)
    true = true / true.norm(dim=-1, keepdim=True)
    sae = make_sae(cfg, seed=0).train()
    sae.init_from_data(sample(4096, true, gen))
    if n_alive_at_init is not None:
        with torch.no_grad():
            sae.W_enc[:, n_alive_at_init:] *= 0.01
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    tracker = LatentTracker(cfg.d_sae, dead_window, torch.device("cpu"))  # as pipeline.train keeps it
    first: torch.Tensor | None = None
    for step in range(STEPS):
        out = sae.training_loss(sample(BATCH, true, gen), step, STEPS, tracker.dead_mask())
        first = out.latents.detach() if first is None else first
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        tracker.update(out.firing(cfg.d_sae)[0], BATCH)
    sae.eval()  # batchtopk: the inference threshold, not the batch's top B·k
    x = sample(4096, true, gen)
    with torch.no_grad():
        f = sae.encode(x)  # [4096, d_sae]
        x_hat = sae.decode(f)
    live = (f != 0).double().mean(0) >= LIVE_RATE
    recovered, matched = score(true, sae.feature_directions(), live)
    s = Score(recovered, matched, fvu(x, x_hat), (f != 0).double().sum(-1).mean().item(), int(live.sum()))
    assert first is not None
    return s, sae, first


@dataclass
class Case:
    cfg: dict[str, Any]
    fvu: float  # upper bound
    l0: tuple[float, float] | None = None  # (low, high); None where the architecture fixes or has no L0
    matched: float | None = 0.85  # lower bound on the reverse share; None where it does not apply
    dead_window: int = 10_000_000  # train.dead_window_tokens: AuxK's notion of dead


# Measured (seeds 0-3): recovered >= 0.98, matched >= 0.93 for every sparse arch here.
CASES = {
    # TopK: L0 <= k by construction (k = 4 > the ~3 true features), so no L0 bound. FVU 0.11-0.12: tokens
    # with more than 4 active features (~18%) cannot be reconstructed exactly.
    "topk": Case(dict(arch="topk", k=4), fvu=0.15, dead_window=50 * BATCH),
    # BatchTopK: L0 = k on average over each training batch by construction, but at inference a learned
    # threshold decides; its L0 (3.45-3.55) staying near k checks the threshold estimate. FVU 0.088-0.091.
    "batchtopk": Case(dict(arch="batchtopk", k=4), fvu=0.12, l0=(3.0, 5.0), dead_window=50 * BATCH),
    # L1 penalty (2024 recipe): sparsity is learned, L0 5.9-7.0 (true ~3), FVU 0.17-0.20 (L1 shrinkage).
    "relu_l1": Case(dict(arch="relu_l1", recipe="2024", l1_coeff=2.0), fvu=0.25, l0=(0.0, 9.0)),
    # Decoder rows initialised 10x smaller than the recipe's 0.1: the penalty sum_i f_i ||W_dec,i|| makes
    # the objective invariant to each latent's scale (Anthropic, April 2024 update), so the same numbers
    # come out (FVU 0.17-0.20, L0 6.3-6.9); an unweighted L1 would cost ~10x more here and collapse.
    "relu_l1_small_decoder": Case(dict(arch="relu_l1", recipe="2024", l1_coeff=2.0, init_decoder_norm=0.01),
                                  fvu=0.25, l0=(0.0, 9.0)),
    # JumpReLU: 300 steps at lr 1e-2 move log(theta) by at most ~3, so theta starts near a working value for
    # activations of size ~3 (scaled space) instead of the paper's 0.001 (for long runs); L0 2.85-2.93, FVU
    # 0.10-0.11.
    "jumprelu": Case(dict(arch="jumprelu", l0_coeff=1.0, jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.1),
                     fvu=0.13, l0=(0.0, 4.0)),
    # Gated: L0 4.4-4.6, FVU 0.093-0.097.
    "gated": Case(dict(arch="gated", l1_coeff=3.0), fvu=0.12, l0=(0.0, 6.0)),
    # KL (sigmoid units): the code is never exactly 0, so every latent is "live", no L0, and the reverse
    # share counts the 64 surplus latents too (0.45-0.48): only the dictionary and the FVU (0.22-0.30) are
    # checked. Recovered 0.91-0.95, hence its own bound below. The dense baseline has no dictionary.
    "kl": Case(dict(arch="kl"), fvu=0.35, matched=None),
}


def check(s: Score, case: Case, min_recovered: float = 0.95) -> None:
    assert s.recovered >= min_recovered, s
    if case.matched is not None:
        assert s.matched >= case.matched, s
    assert s.fvu <= case.fvu, s
    if case.l0 is not None:
        assert case.l0[0] <= s.l0 <= case.l0[1], s


def test_random_dictionary_scores_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(N_FEATURES, D, generator=gen), dim=-1)
    rand = torch.nn.functional.normalize(torch.randn(D_SAE, D, generator=gen), dim=-1)
    assert score(true, rand, torch.ones(D_SAE, dtype=torch.bool)) == (0.0, 0.0)  # the bar is not trivially met
    assert score(true, torch.cat([true, rand]), torch.ones(N_FEATURES + D_SAE, dtype=torch.bool)) == (1.0, 1 / 3)


@pytest.mark.parametrize("name", list(CASES))
def test_recovers_ground_truth(name: str) -> None:
    case = CASES[name]
    s, _, _ = train_and_score(SAEConfig(d_in=D, d_sae=D_SAE, **case.cfg), dead_window=case.dead_window)
    check(s, case, min_recovered=0.85 if name == "kl" else 0.95)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_revives_dead_latents(arch: str) -> None:
    # 112 of 128 latents start dead (shrunk encoder columns: never in a TopK slot, so no gradient from the
    # reconstruction); 16 live latents cannot cover 64 features. Only AuxK (Gao et al. 2024, "Preventing dead
    # latents") reaches them. Measured with AuxK: recovered 0.97-1.0, matched 0.91-1.0, FVU 0.085-0.12;
    # with aux_coeff = 0: recovered 0.02-0.03, matched 0.06-0.13, FVU 0.40-0.43.
    cfg = SAEConfig(arch=arch, d_in=D, d_sae=D_SAE, k=4)
    s, sae, first = train_and_score(cfg, n_alive_at_init=16, dead_window=2 * BATCH)
    # The case is real: the 112 shrunk latents took ~1% of the first batch's firings (topk: 2 of them fired at
    # all; batchtopk: none).
    fired = first != 0
    assert fired[:, 16:].sum() <= 0.05 * fired.sum()
    check(s, CASES[arch])
