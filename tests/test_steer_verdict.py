"""The steering verdict: SAE method chosen on validation only, bootstrap intervals, verdict wording."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from pipeline.steering.bootstrap import Resamples, interval
from pipeline.steering.summary import add_scores, choose_and_report
from pipeline.steering.verdict import choose_sae_method


def _grid(values: list[list[float]], n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    v = np.array(values, dtype=np.float64)
    iv = interval(v, Resamples.draw(v.shape[0], v.shape[1], n, seed))
    return iv.mean, iv.low, iv.high


def test_resamples_are_multiplicities_and_repeat_by_seed() -> None:
    rs = Resamples.draw(5, 3, 200, seed=7)
    assert rs.prompts.shape == (200, 5) and rs.features.shape == (200, 3)
    assert (rs.prompts.sum(1) == 5).all() and (rs.features.sum(1) == 3).all()  # P and F draws per resample
    again = Resamples.draw(5, 3, 200, seed=7)
    assert np.array_equal(rs.prompts, again.prompts) and np.array_equal(rs.features, again.features)
    assert not np.array_equal(rs.prompts, Resamples.draw(5, 3, 200, seed=8).prompts)


def test_constant_values_give_a_zero_width_interval() -> None:
    assert _grid([[0.25] * 3] * 4) == (0.25, 0.25, 0.25)
    mean, low, high = _grid([[-0.1] * 2] * 5)
    assert mean == pytest.approx(-0.1) and low == pytest.approx(-0.1) and high == pytest.approx(-0.1)


def test_interval_by_hand() -> None:
    # 2 prompts, 1 feature: resampled means 0 (p=1/4), 0.5 (1/2), 1 (1/4) -> 2.5% / 97.5% quantiles 0 and 1.
    assert _grid([[0.0], [1.0]]) == (0.5, 0.0, 1.0)
    # Two-way: the prompts agree, the features differ. Resampling features gives 1, 2, 3 with p = 1/4,
    # 1/2, 1/4; a prompt-only bootstrap would claim [2, 2].
    assert _grid([[1.0, 3.0], [1.0, 3.0]]) == (2.0, 1.0, 3.0)
    # A unit without a value (NaN) is left out of every mean.
    assert _grid([[1.0, math.nan], [3.0, math.nan]]) == (2.0, 1.0, 3.0)
    # One prompt: no interval (a zero-width one would pass for certainty).
    mean, low, high = _grid([[1.0, 3.0]])
    assert mean == 2.0 and math.isnan(low) and math.isnan(high)


def test_interval_is_bit_repeatable_for_a_seed() -> None:
    v = np.random.default_rng(3).normal(size=(12, 3)).tolist()
    first = _grid(v, seed=5)
    assert _grid(v, seed=5) == first  # exactly, not approximately
    assert first[1] < first[0] < first[2]
    assert _grid(v, seed=6)[1:] != first[1:]


def test_choose_sae_method_ties_and_missing() -> None:
    assert choose_sae_method({"add": 0.4, "clamp": 0.5}) == "clamp"
    assert choose_sae_method({"add": 0.5, "clamp": 0.5}) == "add"  # tie: the simpler intervention
    assert choose_sae_method({"add": math.nan, "clamp": 0.1, "dim": 0.9}) == "clamp"  # baselines never chosen
    assert choose_sae_method({"dim": 0.9}) is None


def _hm(c: float) -> float:
    return 2 * c / (1 + c)  # harmonic mean with fluency 1


def _frame(concept: dict[tuple[str, str], list[float]], judge: dict[tuple[str, str], list[float]] | None = None,
           features: tuple[int, ...] = (3,)) -> pl.DataFrame:
    """Rows at one coefficient: ``concept[(method, split)]`` is topic_score@2 per prompt of that split.

    Perplexity equals the unsteered row's, so fluency@2 = 1 and hm@2 = 2c / (1 + c).
    """
    n = {s: len(next(v for (m, sp), v in concept.items() if sp == s)) for s in ("validation", "test")}
    prompts = [(i, "validation") for i in range(n["validation"])] + [(100 + i, "test") for i in range(n["test"])]
    rows = []
    for f in features:
        for pid, split in prompts:
            k = pid - (100 if split == "test" else 0)
            for m in ["none", *sorted({m for m, _ in concept})]:
                c = 0.1 if m == "none" else concept[(m, split)][k]
                row = dict(prompt_id=pid, split=split, feature=f, topic="music", method=m,
                           coefficient=0.0 if m == "none" else 1.0,
                           **{"topic_score@2": c, "perplexity@2": 10.0, "concept_act@2": 0.5, "concept_frac@2": 0.0,
                              "distinct2@2": 1.0, "kl@2": 0.0, "other_features@2": 0.0})
                if judge is not None:
                    j = 0.0 if m == "none" else judge[(m, split)][k]
                    row.update(judge_concept=2, judge_instruction=2, judge_fluency=2, judge_hm=j)
                rows.append(row)
    return add_scores(pl.DataFrame(rows))


def test_sae_method_is_chosen_on_validation_not_test() -> None:
    # clamp wins on test (hm .947 vs .571) but add wins on validation (.889 vs .75): the verdict speaks for add.
    concept = {("add", "validation"): [0.8, 0.8], ("add", "test"): [0.4, 0.4, 0.4],
               ("clamp", "validation"): [0.6, 0.6], ("clamp", "test"): [0.9, 0.9, 0.9],
               ("dim", "validation"): [0.5, 0.5], ("dim", "test"): [0.5, 0.5, 0.5]}
    judge = {("add", "validation"): [2.0, 2.0], ("add", "test"): [0.5, 0.5, 0.5],
             ("clamp", "validation"): [1.0, 1.0], ("clamp", "test"): [1.5, 1.5, 1.5],
             ("dim", "validation"): [1.0, 1.0], ("dim", "test"): [1.0, 1.0, 1.0]}
    ov = choose_and_report(_frame(concept, judge, features=(3, 4)))["overall"]
    assert ov["sae_method"] == "add"
    assert ov["validation_hm@2"] == {"add": pytest.approx(_hm(0.8)), "clamp": pytest.approx(_hm(0.6))}
    assert "'add' 0.889 vs 'clamp' 0.750" in ov["sae_method_choice"]
    assert ov["sae_hm@3"] == pytest.approx(_hm(0.4))
    assert ov["test_hm@2"]["clamp"]["mean"] == pytest.approx(_hm(0.9))  # reported, not chosen
    # Constant paired differences: a zero-width interval below 0, so add loses to dim.
    d = ov["sae_minus_dim_hm@3"]
    assert d["mean"] == pytest.approx(_hm(0.4) - _hm(0.5))
    assert d["ci95_low"] == pytest.approx(d["mean"]) and d["ci95_high"] == pytest.approx(d["mean"])
    assert d["verdict"] == "loses to" and d["wins"] == "0/2" and "loses to 'dim'" in ov["summary"]
    # The judge's verdict chooses its SAE method on validation judge_hm too.
    assert ov["judge_sae_method"] == "add" and ov["validation_judge_hm"] == {"add": 2.0, "clamp": 1.0}
    assert ov["judge_sae_hm@3"] == 0.5 and ov["judge_sae_minus_dim_hm@3"]["mean"] == -0.5
    assert ov["judge_sae_minus_dim_hm@3"]["verdict"] == "loses to"
    assert ov["bootstrap"]["test_prompts"] == 3 and ov["bootstrap"]["features"] == 2


def test_verdict_says_indistinguishable_when_the_interval_includes_zero() -> None:
    # One feature, 2 test prompts: differences +0.179 and -0.238 (hm .75 - .571, .333 - .571);
    # resampled means -0.238, -0.030, +0.179 -> 95% CI [-0.238, +0.179], which includes 0.
    concept = {("add", "validation"): [0.5, 0.5], ("add", "test"): [0.6, 0.2],
               ("random", "validation"): [0.4, 0.4], ("random", "test"): [0.4, 0.4]}
    ov = choose_and_report(_frame(concept))["overall"]
    d = ov["sae_minus_random_hm@3"]
    hi, lo = _hm(0.6) - _hm(0.4), _hm(0.2) - _hm(0.4)
    assert d["mean"] == pytest.approx((hi + lo) / 2)
    assert d["ci95_low"] == pytest.approx(lo) and d["ci95_high"] == pytest.approx(hi)
    assert d["verdict"] == "is indistinguishable from"
    assert ("is indistinguishable from 'random' (95% CI of the difference includes 0: difference -0.030, "
            "95% CI [-0.238, +0.179]") in ov["summary"]
    assert "beats" not in ov["summary"] and "loses" not in ov["summary"]
    # The same point estimate with a constant difference would be a stated loss.
    flat = choose_and_report(_frame({**concept, ("add", "test"): [0.4 - 0.02, 0.4 - 0.02]}))["overall"]
    assert flat["sae_minus_random_hm@3"]["verdict"] == "loses to"


def test_bootstrap_resamples_and_seed_are_recorded_and_repeat() -> None:
    concept = {("add", "validation"): [0.5, 0.3], ("add", "test"): [0.6, 0.2, 0.5, 0.1],
               ("dim", "validation"): [0.4, 0.4], ("dim", "test"): [0.4, 0.3, 0.2, 0.6]}
    df = _frame(concept, features=(1, 2, 5))
    a = choose_and_report(df, seed=1, n_resamples=500)["overall"]
    assert a == choose_and_report(df, seed=1, n_resamples=500)["overall"]
    assert a["bootstrap"]["resamples"] == 500 and a["bootstrap"]["seed"] == 1
    b = choose_and_report(df, seed=2, n_resamples=500)["overall"]
    assert b["sae_minus_dim_hm@3"]["mean"] == a["sae_minus_dim_hm@3"]["mean"]  # the seed moves only the bounds
