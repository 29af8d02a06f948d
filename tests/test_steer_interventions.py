"""Interventions at an SAE's hook on a tiny random Llama: addition, clamping, ablation, positions, generation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipeline.hooks import final_norm_and_unembed, intervene
from pipeline.sae import SAEConfig, make_sae
from pipeline.steering.generate import continuation_nll, generate, left_pad
from pipeline.steering.interventions import RowSteering, clamp_feature, feature_write, steer
from pipeline.steering.protocol import (
    FeaturePlan,
    Prompt,
    SweepConfig,
    SweepTiming,
    ablation_effect,
    run_sweep,
)

HOOK = "layers.1.resid_post"
LAST = "layers.2.resid_post"


@pytest.fixture(scope="module")
def lm(tiny_llama: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def _sae(d_in: int = 32, d_sae: int = 64, seed: int = 0):
    sae = make_sae(SAEConfig(arch="relu_l1", d_in=d_in, d_sae=d_sae, hook=HOOK), seed=seed)
    with torch.no_grad():
        sae.W_dec.copy_(sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True))  # unit decoder rows: d_f = W_dec[f]
        sae.W_enc.mul_(3.0)  # fire on a good share of tokens
    return sae.eval().requires_grad_(False)


def _hooked(model, ids, hook: str, steering: RowSteering | None) -> torch.Tensor:
    """The hook's hidden state after the steering edit (a recorder entered after the steering context)."""
    seen = {}

    def rec(h):
        seen["h"] = h.clone()
        return h

    with steer(model, hook, steering), intervene(model, hook, rec), torch.no_grad():
        model(input_ids=ids)
    return seen["h"]


def test_addition_shifts_hook_by_alpha_m_d(lm) -> None:
    model, _ = lm
    sae = _sae()
    ids = torch.tensor([[5, 17, 33, 90, 12, 7], [8, 9, 10, 11, 12, 13]])
    f, m = 3, 2.5
    alphas = torch.tensor([0.0, 4.0])
    add = alphas[:, None] * feature_write(sae, f, m)[None]  # [B, d]
    clean = _hooked(model, ids, HOOK, None)
    steered = _hooked(model, ids, HOOK, RowSteering(sae, f, add))
    d_f = sae.W_dec[f] / sae.W_dec[f].norm()
    expected = alphas[:, None, None] * m * d_f  # [B, 1, d]
    torch.testing.assert_close(steered - clean, expected.expand_as(clean), atol=1e-5, rtol=0)
    assert (steered[0] == clean[0]).all()  # coefficient 0 is an exact no-op


def test_clamp_changes_only_that_feature_and_keeps_error(lm) -> None:
    model, _ = lm
    sae = _sae()
    ids = torch.tensor([[5, 17, 33, 90, 12, 7]])
    clean = _hooked(model, ids, HOOK, None)
    f_clean = sae.encode(clean)
    feat = int(f_clean[0].sum(0).argmax())  # a feature that fires here
    target = torch.tensor([7.0])
    steered = _hooked(model, ids, HOOK, RowSteering(sae, feat, None, target))
    f_target = f_clean.clone()
    f_target[..., feat] = 7.0
    err_clean = clean - sae.decode(f_clean)
    err_steered = steered - sae.decode(f_target)
    torch.testing.assert_close(err_steered, err_clean, atol=1e-5, rtol=0)  # error term untouched
    # Only feature `feat`'s write changed: the edit is (target - f) * W_dec[feat] at every position.
    delta = (7.0 - f_clean[..., feat])[..., None] * sae.W_dec[feat]
    torch.testing.assert_close(steered - clean, delta, atol=1e-5, rtol=0)
    # And the helper agrees with the hook path.
    torch.testing.assert_close(clamp_feature(sae, clean, feat, target), steered, atol=1e-6, rtol=0)


def _planted(model, token: int):
    """An SAE whose feature 0 reads and writes the unembedding direction of ``token`` at the last layer."""
    _, W_U = final_norm_and_unembed(model)
    u = W_U[token] / W_U[token].norm()
    sae = make_sae(SAEConfig(arch="relu_l1", d_in=32, d_sae=8, hook=LAST), seed=1)
    with torch.no_grad():
        sae.W_dec.copy_(sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True))
        sae.W_dec[0] = u
        sae.W_enc[:, 0] = u
        sae.b_enc.zero_()
    return sae.eval().requires_grad_(False), u


def test_ablating_planted_feature_lowers_its_token(lm) -> None:
    model = copy.deepcopy(lm[0])
    token = 42
    with torch.no_grad():  # a random tiny model's logits are flat; give the token's unembedding some weight
        model.get_output_embeddings().weight[token] *= 40.0
    sae, u = _planted(model, token)
    ids = torch.tensor([[5, 17, 33, 90, 12, 7]])

    def plant(h):  # the model "computes" the feature: its residual carries u strongly
        return h + 20.0 * u

    def p_token(ablate: bool) -> float:
        with intervene(model, LAST, plant), steer(model, LAST, RowSteering(sae, 0, None, torch.zeros(1)) if ablate else None):
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
        return float(torch.softmax(logits, -1)[token])

    with torch.no_grad():
        p_clean = float(torch.softmax(model(input_ids=ids).logits[0, -1], -1)[token])
    planted, ablated = p_token(False), p_token(True)
    assert planted > 0.5 > p_clean  # the planted feature drives the token
    assert ablated < planted / 10  # ablating it (error kept) removes the effect
    assert ablated < 2 * p_clean + 1e-3


def test_ablation_effect_is_zero_where_feature_never_fires(lm) -> None:
    model, _ = lm
    sae, _ = _planted(model, 42)
    with torch.no_grad():
        sae.b_enc[0] = -1e4  # feature 0 can never fire
    ctx = [[5, 17, 33, 90, 12, 7, 3, 4], [8, 9, 10, 11, 12, 13, 14, 15]]
    out = ablation_effect(model, sae, LAST, 0, ctx, ctx)
    assert out["ablation_dloss_fire@2"] == 0.0 and out["ablation_effect@2"] == 0.0


def test_generated_only_positions_with_position_counter() -> None:
    sae = _sae()
    add = torch.ones(1, 32)
    s = RowSteering(sae, 0, add, start=4)
    h = torch.zeros(1, 5, 32)
    out = s(h)  # prefill: positions 0..4, only 4 edited
    assert (out[0, :4] == 0).all() and (out[0, 4] == 1).all()
    out = s(torch.zeros(1, 1, 32))  # decode step: position 5, edited
    assert (out == 1).all() and s.offset == 6
    s.reset(start=10)
    assert (s(torch.zeros(1, 3, 32)) == 0).all()


def test_generate_left_padding_matches_single_rows_and_generated_only_keeps_prompt(lm) -> None:
    model, tok = lm
    a, b = [0, 5, 17, 33, 90], [0, 8, 9]
    new, _ = generate(model, left_pad([a, b], tok.pad_token_id), 6)
    for i, seq in enumerate((a, b)):
        single, _ = generate(model, left_pad([seq], tok.pad_token_id), 6)
        assert new[i].tolist() == single[0].tolist()
    # 'generated' mode steers from the last prompt position: earlier prompt logits stay clean.
    sae = _sae()
    batch = left_pad([a], tok.pad_token_id)
    _, clean_logits = generate(model, batch, 3)
    rs = RowSteering(sae, 0, 50.0 * sae.W_dec[:1].clone())
    with steer(model, HOOK, rs, start=batch.width - 1):
        steered_new, steered_logits = generate(model, batch, 3)
    torch.testing.assert_close(steered_logits[:, :-1], clean_logits[:, :-1])
    assert not torch.allclose(steered_logits[:, -1], clean_logits[:, -1])
    assert rs.offset == batch.width + 2  # prefill + 2 decode steps


def test_continuation_nll_matches_manual_cross_entropy(lm) -> None:
    model, _ = lm
    seq = [0, 5, 17, 33, 90, 12]
    nll = continuation_nll(model, left_pad([seq, seq[2:]], 2), 3)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[2:5], torch.tensor(seq[3:6]), reduction="none")
    torch.testing.assert_close(nll[0], ref, atol=1e-5, rtol=0)
    assert nll.shape == (2, 3)


def test_run_sweep_returns_rows_and_timing_leaving_its_config_alone(lm) -> None:
    """Timings are a return value, not written into the config (which may be shared across features)."""
    import dataclasses

    model, tok = lm
    sae = _sae()
    write = feature_write(sae, 3, 2.0)
    plan = FeaturePlan(3, None, 2.0, {"add": write, "random": -write})
    prompts = [Prompt(0, "a", "validation", [5, 17, 33]), Prompt(1, "b", "test", [8, 9])]
    cfg = SweepConfig(HOOK, ["add", "clamp", "random"], [1.0, 4.0], max_new_tokens=3, batch_size=7)
    before = dataclasses.asdict(cfg)
    rows, timing = run_sweep(model, tok, sae, plan, prompts, cfg, None)
    assert dataclasses.asdict(cfg) == before
    per_prompt = 1 + 3 * 2  # the unsteered reference + methods x coefficients
    assert len(rows) == 2 * per_prompt and isinstance(timing, SweepTiming)
    assert (timing.rows, timing.tokens) == (2 * per_prompt, 2 * per_prompt * 3) and timing.generate_s > 0
    assert [r["method"] for r in rows[:per_prompt]] == ["none"] + ["add"] * 2 + ["clamp"] * 2 + ["random"] * 2


def test_generate_left_padding_gpt2_absolute_positions(tiny_gpt2: Path) -> None:
    """GPT-2 has learned absolute positions: left padding must not shift them (position_ids from the mask)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32).eval()
    pad = AutoTokenizer.from_pretrained(tiny_gpt2).pad_token_id
    a, b = [0, 5, 17, 33, 90, 12], [0, 8]
    new, _ = generate(model, left_pad([a, b], pad), 5)
    single, _ = generate(model, left_pad([b], pad), 5)
    assert new[1].tolist() == single[0].tolist()
    # and steering works through GPT-2's tuple-returning blocks
    sae = _sae()
    with steer(model, HOOK, RowSteering(sae, 0, 80.0 * sae.W_dec[:1].clone().expand(2, -1))):
        steered, _ = generate(model, left_pad([a, b], pad), 5)
    assert not torch.equal(steered, new)


def test_frozen_positions_are_left_alone() -> None:
    sae = _sae()
    frozen = torch.tensor([[True, False, False], [False, False, True]])  # [B, T0]: e.g. BOS positions
    s = RowSteering(sae, 0, torch.ones(2, 32), frozen=frozen)
    h = torch.zeros(2, 3, 32)
    out = s(h)
    assert out[~frozen].eq(1).all() and out[frozen].eq(0).all()
    assert s(torch.zeros(2, 1, 32)).eq(1).all()  # a generated position, past the frozen ones


def test_ablation_keeps_special_positions(lm) -> None:
    model, _ = lm
    sae, _ = _planted(model, 42)
    ctx = [[5, 17, 33, 90, 12, 7, 3, 4]]
    # Every position special: nothing is ablated and no prediction is averaged (NaN-free 0 / 0 -> 0).
    out = ablation_effect(model, sae, LAST, 0, ctx, [], special_ids=set(ctx[0]))
    assert out["ablation_dloss_fire@2"] == 0.0
    assert ablation_effect(model, sae, LAST, 0, ctx, [])["ablation_dloss_fire@2"] != 0.0
