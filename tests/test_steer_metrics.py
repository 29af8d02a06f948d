"""Steering metrics, statistics and the protocol's coefficient choice against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.activations import open_activations, write_activations
from pipeline.errors import UserError
from pipeline.steering.baselines import dim_direction, feature_topics, select_features
from pipeline.steering.metrics import (
    TopicModel,
    concept_stats,
    distinct_n,
    fluency,
    harmonic_mean,
    kl_divergence,
    label_windows,
    other_features_change,
    perplexity,
)
from pipeline.steering.stats import collect_stats, label_grid
from pipeline.steering.summary import add_scores, choose_and_report


def test_topic_model_naive_bayes_by_hand() -> None:
    # topic 0 tokens: 0,0,1 -> counts+1 = [3,2,1]/6; topic 1 tokens: 1,2 -> [1,2,2]/5
    tm = TopicModel.fit(np.array([0, 0, 1, 1, 2, 9]), np.array([0, 0, 0, 1, 1, -1]), ["a", "b"], vocab_size=3)
    np.testing.assert_allclose(np.exp(tm.log_probs), [[3 / 6, 2 / 6, 1 / 6], [1 / 5, 2 / 5, 2 / 5]])
    p = tm.scores(np.array([[0]]))
    assert p[0, 0] == pytest.approx(0.5 / (0.5 + 0.2))
    # two tokens: mean log-likelihood, i.e. a geometric mean of per-token likelihoods
    p2 = tm.scores(np.array([[0, 2]]))
    a, b = math.sqrt(0.5 * 1 / 6), math.sqrt(0.2 * 0.4)
    assert p2[0, 0] == pytest.approx(a / (a + b))
    assert tm.accuracy(np.array([[0, 0], [2, 2]]), np.array([0, 1])) == 1.0


def test_label_windows() -> None:
    toks = np.arange(8).reshape(1, 8)
    labs = np.array([[0, 0, 0, 1, 1, 1, -1, -1]])
    w, lab = label_windows(toks, labs, 3)  # windows [0:3] (topic 0) and [3:6] (topic 1)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5]] and lab.tolist() == [0, 1]


def test_kl_concept_other_fluency_hm_by_hand() -> None:
    clean = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    steered = torch.log(torch.tensor([[[0.9, 0.1], [0.5, 0.5]]]))
    kl_first = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(kl_divergence(clean, steered, torch.tensor([[True, False]]))[0]) == pytest.approx(kl_first, rel=1e-5)
    assert float(kl_divergence(clean, steered, torch.tensor([[True, True]]))[0]) == pytest.approx(kl_first / 2, rel=1e-5)
    act, frac = concept_stats(torch.tensor([[0.0, 2.0, 4.0, 0.0]]), 4.0)
    assert float(act[0]) == pytest.approx(0.375) and float(frac[0]) == 0.5
    f = torch.tensor([[[1.0, 2.0, 3.0]]])
    f2 = torch.tensor([[[5.0, 2.0, 1.0]]])
    assert float(other_features_change(f, f2, 0, torch.tensor([[True]]))[0]) == pytest.approx(2 / 5)
    assert float(perplexity(torch.tensor([[math.log(2.0), math.log(8.0)]]))[0]) == pytest.approx(4.0)
    np.testing.assert_allclose(fluency(np.array([10.0, 5.0, 2.0]), np.array([5.0, 5.0, 5.0])), [0.5, 1.0, 1.0])
    # bigrams of [1,2,1,2,1]: (1,2),(2,1),(1,2),(2,1) -> 2 distinct of 4; [3,4,5]: 2 of 2
    np.testing.assert_allclose(distinct_n(np.array([[1, 2, 1, 2, 1], [3, 4, 5, 6, 7]]), 2), [0.5, 1.0])
    np.testing.assert_allclose(harmonic_mean(np.array([0.5, 0.0, 1.0]), np.array([1.0, 0.0, 1.0])), [2 / 3, 0.0, 1.0])


def _rows() -> pl.DataFrame:
    """One feature, 3 prompts (1 validation, 2 identical test); 'add' is best at coefficient 2 on validation."""
    rows = []
    for pid, split in ((0, "validation"), (1, "test"), (2, "test")):
        rows.append(dict(prompt_id=pid, split=split, feature=3, topic="music", method="none", coefficient=0.0,
                         **{"topic_score@2": 0.1, "perplexity@2": 10.0, "concept_act@2": 0.0}))
        for m, c, topic, ppl in (("add", 1.0, 0.3, 10.0), ("add", 2.0, 0.8, 12.5), ("add", 4.0, 1.0, 40.0),
                                 ("random", 1.0, 0.1, 10.0), ("random", 2.0, 0.12, 20.0), ("random", 4.0, 0.15, 50.0)):
            rows.append(dict(prompt_id=pid, split=split, feature=3, topic="music", method=m, coefficient=c,
                             **{"topic_score@2": topic + (0.05 if split == "test" else 0.0), "perplexity@2": ppl,
                                "concept_act@2": 0.5}))
    df = pl.DataFrame(rows)
    for k in ("concept_frac@2", "distinct2@2", "kl@2", "other_features@2"):
        df = df.with_columns(pl.lit(0.0).alias(k))
    return df


def test_coefficient_chosen_on_validation_reported_on_test() -> None:
    df = add_scores(_rows())
    r = df.filter((pl.col("method") == "add") & (pl.col("coefficient") == 2.0) & (pl.col("split") == "validation"))
    assert r["fluency@2"][0] == pytest.approx(10 / 12.5)
    assert r["hm@2"][0] == pytest.approx(2 * 0.8 * 0.8 / 1.6)
    rep = choose_and_report(df)
    add = rep["features"]["3"]["methods"]["add"]
    # validation hm: c=1: 2*.3*1/1.3=.4615, c=2: .8, c=4: 2*1*.25/1.25=.4
    assert add["coefficient"] == 2.0
    assert add["test"]["concept@2"] == pytest.approx(0.85)
    assert add["test"]["hm@2"] == pytest.approx(2 * 0.85 * 0.8 / 1.65)
    # random, validation hm: c=1: 2*.1*1/1.1=.182, c=2: 2*.12*.5/.62=.194, c=4: 2*.15*.2/.35=.171
    assert rep["features"]["3"]["methods"]["random"]["coefficient"] == 2.0
    ov = rep["overall"]
    assert ov["sae_method"] == "add" and ov["sae_method_choice"] == "the only SAE method with a validation hm@2"
    d = ov["sae_minus_random_hm@3"]  # the two test prompts agree: a zero-width interval above 0
    assert d["mean"] == pytest.approx(2 * 0.85 * 0.8 / 1.65 - 2 * 0.17 * 0.5 / 0.67)
    assert d["ci95_low"] == pytest.approx(d["mean"]) and d["ci95_high"] == pytest.approx(d["mean"])
    assert ov["unsteered_concept@2"] == pytest.approx(0.1) and ov["sae_concept_gain@3"] == pytest.approx(0.75)
    assert d["verdict"] == "beats" and d["wins"] == "1/1" and "beats 'random'" in ov["summary"]


class _DiagSAE:
    """f = relu(x) on 3 dims: feature i is coordinate i."""

    W_dec = torch.eye(3)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().relu()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec


def test_stats_selection_and_dim_direction(tmp_path: Path) -> None:
    # 2 contexts x 4 positions; context 10 is document 1 (topic a), context 11 is document 2 (topic b).
    contexts = pl.DataFrame({"context_id": [10, 11], "split": ["validation"] * 2,
                             "token_ids": [[1, 2, 3, 4], [5, 6, 7, 8]], "document_ids": [[1, 1, 1, 1], [2, 2, 2, 2]]})
    documents = pl.DataFrame({"document_id": [1, 2], "label": ["a", "b"]})
    acts = np.array([[2, 0, 1], [4, 0, 1], [2, 0, 1], [4, 0, 1],   # topic a: feature 0 fires, mean 3
                     [0, 1, 1], [0, 3, 1], [0, 1, 1], [0, 3, 1]], dtype=np.float32)  # topic b: feature 1, mean 2
    write_activations(tmp_path / "ds", acts, context_id=np.repeat([10, 11], 4), position=np.tile(np.arange(4), 2),
                      hook="h", dtype="float32")
    topics, rows, grid = label_grid(contexts, documents)
    assert topics == ["a", "b"] and grid.tolist() == [[0] * 4, [1] * 4]
    st = collect_stats(_DiagSAE(), open_activations(tmp_path / "ds"), topics, rows, grid, max_tokens=100, batch_size=3)
    np.testing.assert_allclose(st.max_act, [4, 3, 1])
    np.testing.assert_allclose(st.fire_count, [4, 4, 8])
    np.testing.assert_allclose(st.topic_mean, [[3, 0, 1], [0, 2, 1]])
    np.testing.assert_allclose(st.context_max, [[4, 0, 1], [0, 3, 1]])
    assert st.scale(0, "quantile", 0.5) == 4.0
    assert select_features(st, None, [], 2, "topic", min_firing=1) == [0, 1]
    assert feature_topics(st, None, [0, 1]) == {0: "a", 1: "b"}
    np.testing.assert_allclose(dim_direction(st, "a"), np.array([3, -2, 0]) / math.sqrt(13), rtol=1e-6)
    # interpretation output, when present, decides (versioned column names)
    interp = pl.DataFrame({"feature": [0, 1, 2], "topic_auroc@1": [0.6, 0.9, 0.99], "topic": ["a", "b", "zzz"],
                           "detection_balanced_accuracy@1": [0.5, float("nan"), 0.7]})
    assert select_features(st, interp, [], 1, "auroc", min_firing=1) == [1]  # 'zzz' is no corpus topic
    assert select_features(st, interp, [], 2, "score", min_firing=1) == [2, 0]  # NaN = not explained
    assert feature_topics(st, interp, [0, 1]) == {0: "a", 1: "b"}
    with pytest.raises(UserError, match="steer.select_by"):
        select_features(st, None, [], 2, "score", min_firing=1)
    with pytest.raises(UserError, match="steer.features"):
        select_features(st, None, [7], 2, "topic", min_firing=1)


def test_stats_leave_special_token_positions_out(tmp_path: Path) -> None:
    # Context 10 (topic a) and 11 (topic b), each: BOS (id 1) at position 0, then 3 text tokens. The BOS
    # rows are the attention-sink outlier: feature 0 fires at 9 there, and the hidden state is large in
    # dim 2; with them counted, m_f of feature 0 is 9 (no text token gets there) and the topic-a minus
    # topic-b direction points along dim 2 (a's BOS is larger). Excluded, both come from text alone.
    contexts = pl.DataFrame({"context_id": [10, 11], "split": ["validation"] * 2,
                             "token_ids": [[1, 2, 3, 4], [1, 6, 7, 8]], "document_ids": [[1, 1, 1, 1], [2, 2, 2, 2]]})
    documents = pl.DataFrame({"document_id": [1, 2], "label": ["a", "b"]})
    acts = np.array([[9, 0, 50], [2, 0, 0], [4, 0, 0], [2, 0, 0],     # topic a: BOS, then feature 0 up to 4
                     [9, 0, 10], [0, 1, 0], [0, 3, 0], [0, 2, 0]], dtype=np.float32)  # topic b: feature 1
    write_activations(tmp_path / "ds", acts, context_id=np.repeat([10, 11], 4), position=np.tile(np.arange(4), 2),
                      token_id=np.array([1, 2, 3, 4, 1, 6, 7, 8]), hook="h", dtype="float32")
    topics, rows, grid = label_grid(contexts, documents)
    ds = open_activations(tmp_path / "ds")
    every = collect_stats(_DiagSAE(), ds, topics, rows, grid, max_tokens=100, batch_size=3)
    text = collect_stats(_DiagSAE(), ds, topics, rows, grid, max_tokens=100, batch_size=3, special_ids={1, 0})
    assert every.scale(0, "max", 0.5) == 9.0 and every.n_tokens == 8  # what the BOS rows did
    assert text.scale(0, "max", 0.5) == 4.0 and text.scale(1, "max", 0.5) == 3.0 and text.n_tokens == 6
    assert text.scale(0, "quantile", 0.5) == 4.0  # per-context maxima over text positions too
    np.testing.assert_allclose(text.fire_count, [3, 3, 0])
    np.testing.assert_allclose(text.topic_tokens, [3, 3])
    np.testing.assert_allclose(text.context_max, [[4, 0, 0], [0, 3, 0]])
    # a - b over text tokens: mean a = [8/3, 0, 0], mean b = [0, 2, 0]
    np.testing.assert_allclose(dim_direction(text, "a"), np.array([4, -3, 0]) / 5, rtol=1e-6)
    assert abs(dim_direction(every, "a")[2]) > 0.9  # counted, BOS took over the direction
    # the limit counts the rows read, special ones included: 4 rows = context 10 only, 3 of them text
    assert collect_stats(_DiagSAE(), ds, topics, rows, grid, max_tokens=4, special_ids={1}).n_tokens == 3
    with pytest.raises(UserError, match="special token id"):
        collect_stats(_DiagSAE(), ds, topics, rows, grid, max_tokens=1, special_ids={1})
