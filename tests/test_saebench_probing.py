"""Sparse probing (pipeline/saebench/{pooling,probing}.py): hand-computed pooling, selection on train only,
validation-chosen full probes, bootstrap intervals; each test names the mutation it catches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.saebench import pooling, probing
from pipeline.saebench.pooling import TEST, TRAIN, VALIDATION

BOS = 1


def test_pooling_by_hand_leaves_out_bos_and_unchosen_documents():
    # Two contexts of 4 positions: ctx 0 = [BOS, d7, d7, d9], ctx 1 = [BOS, d9, d9, d5]; d5 not chosen.
    doc_of = pooling.document_index(np.array([0, 1]), [[7, 7, 7, 9], [9, 9, 9, 5]])
    acts = torch.tensor([[100.0, 0], [1, 2], [3, 4], [5, 6], [100, 0], [7, 8], [9, 10], [50, 50]])
    ctx = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    tok = torch.tensor([BOS, 5, 6, 7, BOS, 8, 9, 10])
    encode = lambda x: x * 2  # noqa: E731  a "SAE" whose latents are twice the input
    llm, sae, n = pooling.pool_documents([(acts, ctx, pos, tok)], doc_of, np.array([7, 9]), {BOS}, encode, 2)
    # d7: tokens (1,2), (3,4) -> (2, 3); d9: (5,6), (7,8), (9,10) -> (7, 8). BOS rows (100, 0) would move both.
    np.testing.assert_allclose(llm, [[2, 3], [7, 8]])
    np.testing.assert_allclose(sae, [[4, 6], [14, 16]])  # encoded per token, pooled over the same mask
    np.testing.assert_array_equal(n, [2, 3])


def test_pooling_mutation_bos_pooled_fails():
    """Mutation: pooling BOS (special ids ignored) moves document 7's mean away from the hand value."""
    doc_of = pooling.document_index(np.array([0]), [[7, 7, 7]])
    acts = torch.tensor([[100.0], [1.0], [3.0]])
    args = (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), torch.tensor([BOS, 5, 6]))
    llm, _, _ = pooling.pool_documents([(acts, *args)], doc_of, np.array([7]), {BOS}, lambda x: x, 1)
    bad, _, _ = pooling.pool_documents([(acts, *args)], doc_of, np.array([7]), set(), lambda x: x, 1)
    assert llm[0, 0] == pytest.approx(2.0)
    assert bad[0, 0] != pytest.approx(2.0)


def test_split_is_document_level_stratified_and_seeded():
    labels = np.array(["a"] * 10 + ["b"] * 10)
    s = pooling.split_documents(labels, 0.2, 0.2, seed=0)
    for lab in "ab":
        got = s[labels == lab]
        assert (got == TEST).sum() == 2 and (got == VALIDATION).sum() == 2 and (got == TRAIN).sum() == 6
    np.testing.assert_array_equal(s, pooling.split_documents(labels, 0.2, 0.2, seed=0))
    assert not np.array_equal(s, pooling.split_documents(labels, 0.2, 0.2, seed=1))


def test_tasks_draw_negatives_evenly_from_other_labels():
    labels = np.array(["a"] * 6 + ["b"] * 6 + ["c"] * 6)
    split = np.tile([TRAIN, TRAIN, TRAIN, TRAIN, VALIDATION, TEST], 3)
    tasks = {t.label: t for t in probing.make_tasks(labels, split, seed=0)}
    t = tasks["a"]
    neg = t.rows[TRAIN][t.y[TRAIN] == 0]
    assert len(neg) == 4 and sorted(labels[neg].tolist()) == ["b", "b", "c", "c"]


def test_mean_diff_selection_by_hand():
    X = np.array([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 2.0, 5.0], [0.0, 0.0, 5.0]])
    y = np.array([1, 1, 0, 0])
    # |mean pos - mean neg|: (2 - 0, 0 - 1, 5 - 5) = (2, 1, 0)
    np.testing.assert_array_equal(probing.mean_diff_order(X, y), [0, 1, 2])


def _planted(seed: int = 0, n_per: int = 40):
    """Two labels; channel 0 separates them strongly on train and validation but not on test; channel 1
    separates them everywhere, weaker than channel 0 on train."""
    rng = np.random.default_rng(seed)
    labels = np.array(["a"] * n_per + ["b"] * n_per)
    split = pooling.split_documents(labels, 0.25, 0.25, seed)
    y = (labels == "a").astype(float)
    X = rng.normal(0, 0.05, (2 * n_per, 4))
    X[:, 0] += np.where(split != TEST, 2 * y, 0.0)  # informative except on test
    X[:, 1] += np.where(split == TEST, 2 * y, 1 * y)  # informative everywhere, weaker on train
    return X, labels, split


def test_top1_selection_uses_train_only():
    """Hand-built: channel 0 has the larger train difference, so top-1 picks it and is near chance on test.
    Mutation: selecting on the test split picks channel 1 and scores 1.0."""
    X, labels, split = _planted()
    t = probing.make_tasks(labels, split, seed=0)[0]
    order = probing.mean_diff_order(X[t.rows[TRAIN]], t.y[TRAIN])
    assert order[0] == 0
    acc = probing.correct_k(X, t, order, 1, seed=0).mean()
    assert acc < 0.8
    cheat = probing.mean_diff_order(X[t.rows[TEST]], t.y[TEST])
    assert probing.correct_k(X, t, cheat, 1, seed=0).mean() == 1.0


def test_sparse_probing_selects_on_train():
    """Through the whole eval: on the planted data the top-1 probe picks channel 0 (train signal) and stays
    below 0.8 on test. Mutation: selecting inputs on the test rows picks channel 1 and reaches 1.0."""
    X, labels, split = _planted()
    res = probing.sparse_probing(X, X, labels, split, [1], seed=0, n_bootstrap=20)
    assert res["mean"]["llm_top_1_test_accuracy"] < 0.8 and res["mean"]["sae_top_1_test_accuracy"] < 0.8


def test_full_probe_chooses_c_on_validation():
    """On noisy data where the C with the best validation accuracy is not the one with the best test accuracy,
    the full probe keeps the validation choice. Mutation: choosing on test picks the other C."""
    for seed in range(30):
        rng = np.random.default_rng(seed)
        labels = np.repeat(["a", "b"], 30)
        split = pooling.split_documents(labels, 0.3, 0.3, seed)
        X = rng.normal(0, 1, (60, 40))
        X[:, 0] += 0.8 * (labels == "a")
        t = probing.make_tasks(labels, split, seed)[0]
        accs = {}
        for c in probing.FULL_CS:
            clf = probing._fit(X[t.rows[TRAIN]], t.y[TRAIN], c, seed)
            accs[c] = tuple(float((clf.predict(X[t.rows[s]]) == t.y[s]).mean()) for s in (VALIDATION, TEST))
        by_val = max(probing.FULL_CS, key=lambda c: (accs[c][0], -probing.FULL_CS.index(c)))
        by_test = max(probing.FULL_CS, key=lambda c: (accs[c][1], -probing.FULL_CS.index(c)))
        if accs[by_val][1] != accs[by_test][1]:
            correct, chosen = probing.correct_full(X, t, seed)
            assert chosen == by_val
            assert correct.mean() == pytest.approx(accs[by_val][1])
            return
    pytest.fail("no seed separates the validation and test choices")


def test_l1_order_admits_the_informative_input_first():
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (200, 20))
    y = (X[:, 7] + 0.1 * rng.normal(size=200) > 0).astype(int)
    assert probing.l1_order(X, y, seed=0)[0] == 7


def test_bootstrap_interval_by_hand():
    correct = {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0])}
    draws = {"a": np.array([[0, 0], [1, 1], [0, 1]]), "b": np.array([[0, 1], [0, 1], [1, 1]])}
    ci, mean_ci = probing.bootstrap(correct, draws)
    # a's resampled accuracies: 1, 0, 0.5 -> percentiles 2.5 / 97.5 of [0, 0.5, 1] = 0.025, 0.975
    assert ci["a"] == pytest.approx((0.025, 0.975))
    assert ci["b"] == pytest.approx((1.0, 1.0))
    # mean over tasks per resample: 1, 0.5, 0.75 -> [0.5, 0.75, 1] -> 0.5125, 0.9875
    assert mean_ci == pytest.approx((0.5125, 0.9875))


def test_sparse_probing_end_to_end_names_and_ranges():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 30)
    split = pooling.split_documents(labels, 0.2, 0.2, 0)
    llm = rng.normal(0, 1, (90, 8))
    llm[:, :3] += 3 * (labels[:, None] == np.array(["a", "b", "c"])[None])
    sae = np.maximum(llm @ rng.normal(0, 1, (8, 32)), 0)
    res = probing.sparse_probing(llm, sae, labels, split, [1, 2, 50], seed=0, n_bootstrap=200)
    assert "llm_top_50_test_accuracy" not in res["mean"]  # k above the width is skipped
    assert "sae_top_50_test_accuracy" not in res["mean"]
    for name in ("sae_top_1_test_accuracy", "llm_top_1_test_accuracy", "sae_l1_top_2_test_accuracy",
                 "sae_test_accuracy", "llm_test_accuracy"):
        lo, hi = res["ci"][name]
        assert 0 <= lo <= res["mean"][name] <= hi <= 1
    assert res["mean"]["llm_top_1_test_accuracy"] > 0.9
    again = probing.sparse_probing(llm, sae, labels, split, [1, 2, 50], seed=0, n_bootstrap=200)
    assert again == res  # seeded: identical
