"""Streaming feature statistics against dense brute-force references, and the versioned metric definitions."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.interpret.bins import auroc_from_counts, best_topic, log_bin, topic_auroc
from pipeline.interpret.contexts import build_context_table
from pipeline.interpret.examples import CodeIndex, select_examples
from pipeline.interpret.lens import cooccurrence_neighbours, decoder_neighbours, logit_lens
from pipeline.interpret.stream import FeatureStream, stream_stats

T, N_CTX, D_SAE, LABELS = 8, 40, 12, ("a", "b", "c")


@pytest.fixture(scope="module")
def world():
    """Sparse 'activations' that are already feature codes (encode = identity), contexts of 2 documents each."""
    rng = np.random.default_rng(0)
    f = rng.exponential(1.0, (N_CTX * T, D_SAE)).astype(np.float32)
    f[rng.random(f.shape) < 0.8] = 0.0  # ~20% density
    docs = np.repeat(np.arange(N_CTX * 2), T // 2).reshape(N_CTX, T)  # two documents per context
    contexts = pl.DataFrame({"context_id": np.arange(N_CTX) * 3 + 5, "split": ["train"] * N_CTX,
                             "token_ids": rng.integers(0, 50, (N_CTX, T)).tolist(), "document_ids": docs.tolist()})
    documents = pl.DataFrame({"document_id": np.arange(N_CTX * 2), "label": [LABELS[i % 3] for i in range(N_CTX * 2)],
                              "title": [f"d{i}" for i in range(N_CTX * 2)]})
    table = build_context_table(contexts, documents, "train")
    cid = np.repeat(table.context_ids, T)
    pos = np.tile(np.arange(T), N_CTX)
    return f, table, cid, pos, docs


def run(world, batch_size: int, n_top: int = 5, reservoir: int = 6):
    f, table, cid, pos, _ = world
    stream = FeatureStream(D_SAE, len(table.label_names), n_top, reservoir, seed=3, cooc_per_token=D_SAE, cooc=True)
    batches = [(torch.from_numpy(f[s:s + batch_size]), torch.from_numpy(cid[s:s + batch_size]),
                torch.from_numpy(pos[s:s + batch_size])) for s in range(0, len(f), batch_size)]
    return stream_stats(batches, lambda x: x, table, stream)


def test_stream_matches_dense_reference(world):
    f, table, _, _, docs = world
    st = run(world, batch_size=29)  # batches cut contexts: the held-back tail must be joined
    assert st.n_tokens == len(f)
    np.testing.assert_array_equal(st.fire_count, (f > 0).sum(0))
    np.testing.assert_allclose(st.act_max, f.max(0))
    np.testing.assert_allclose(st.act_sum, f.sum(0), rtol=1e-5)
    ref_hist = np.zeros_like(st.hist)
    r, j = np.nonzero(f)
    np.add.at(ref_hist, (j, log_bin(torch.from_numpy(f[r, j])).numpy()), 1)
    np.testing.assert_array_equal(st.hist, ref_hist)
    A = (f > 0).astype(np.int64)
    cooc = A.T @ A
    np.fill_diagonal(cooc, 0)
    np.testing.assert_array_equal(st.cooc, cooc)
    cmax = f.reshape(N_CTX, T, D_SAE).max(1)  # [ctx, d]
    np.testing.assert_allclose(st.top_value, -np.sort(-cmax, axis=0)[:5])
    for j in range(D_SAE):  # the stored contexts really have those maxima
        ok = st.top_ctx[:, j] >= 0
        np.testing.assert_allclose(cmax[st.top_ctx[ok, j], j], st.top_value[ok, j])
        assert len(set(st.top_ctx[ok, j])) == ok.sum()  # distinct contexts
    # Segment maxima per label, and the AUROC they give, against pairwise brute force.
    seg = f.reshape(N_CTX, 2, T // 2, D_SAE).max(2).reshape(N_CTX * 2, D_SAE)  # [segment, d]
    seg_label = np.array([i % 3 for i in range(N_CTX * 2)])
    au = topic_auroc(st.topic_hist, st.n_segments)
    np.testing.assert_array_equal(st.n_segments, np.bincount(seg_label))
    for j in range(D_SAE):
        for lab in range(3):
            pos_s, neg_s = seg[seg_label == lab, j], seg[seg_label != lab, j]
            bp, bn = (np.where(x > 0, log_bin(torch.from_numpy(x)).numpy() + 1, 0) for x in (pos_s, neg_s))
            ref = ((bp[:, None] > bn[None, :]).sum() + 0.5 * (bp[:, None] == bn[None, :]).sum()) / (len(bp) * len(bn))
            assert au[j, lab] == pytest.approx(ref)


def test_stream_is_batch_size_invariant(world):
    a, b = run(world, batch_size=13), run(world, batch_size=1000)
    np.testing.assert_array_equal(a.top_value, b.top_value)
    np.testing.assert_array_equal(a.res_ctx, b.res_ctx)  # hash-keyed reservoir: independent of batching
    np.testing.assert_array_equal(a.topic_hist, b.topic_hist)
    np.testing.assert_array_equal(a.cooc, b.cooc)


def test_examples_token_level_activations(world):
    f, table, _, _, _ = world
    st = run(world, batch_size=50)
    sel = select_examples(st, n_quantiles=3, per_bin=1, n_random=2, seed=0)
    acts = CodeIndex(st.codes, D_SAE).gather(sel, T)
    dense = f.reshape(N_CTX, T, D_SAE)
    np.testing.assert_allclose(acts, dense[sel.ctx, :, sel.feature])
    rand = sel.kind == 2
    assert rand.any() and (acts[rand] == 0).all()  # negatives: the feature is silent in the whole context
    top0 = (sel.kind == 0) & (sel.rank == 0)
    np.testing.assert_allclose(acts[top0].max(1), f.max(0)[sel.feature[top0]])
    q = sel.kind == 1
    assert q.any() and (acts[q].max(1) > 0).all()


def test_auroc_hand_computed():
    # pos: one in bin 1, one in bin 2; neg: one in bin 0, one in bin 1.
    # pairs: (1>0) 1, (1=1) 0.5, (2>0) 1, (2>1) 1 -> 3.5 / 4
    assert auroc_from_counts(np.array([0, 1, 1]), np.array([1, 1, 0])) == pytest.approx(0.875)
    assert auroc_from_counts(np.array([0, 0, 3]), np.array([5, 0, 0])) == 1.0
    assert np.isnan(auroc_from_counts(np.array([0, 0, 0]), np.array([1, 0, 0])))
    idx, best = best_topic(np.array([[0.2, 0.9, np.nan], [np.nan, np.nan, np.nan]]))
    assert idx.tolist() == [1, -1] and best[0] == 0.9 and np.isnan(best[1])


def test_logit_lens_handles_norm_weight_and_layernorm_bias():
    torch.manual_seed(0)
    d, V = 16, 40
    W_U = torch.randn(V, d)
    W_dec = torch.randn(5, d)
    rms = torch.nn.RMSNorm(d)
    with torch.no_grad():
        rms.weight.copy_(torch.rand(d) + 0.1)
    ti, tv, bi, bv = logit_lens(W_dec, rms, W_U, k=3)
    ref = (W_dec * rms.weight) @ W_U.T  # weight kept, data-dependent scale dropped (positive: same order)
    assert ti.tolist() == ref.topk(3, dim=1).indices.tolist()
    assert bi.tolist() == ref.topk(3, dim=1, largest=False).indices.tolist()
    ln = torch.nn.LayerNorm(d)
    with torch.no_grad():
        ln.bias.copy_(torch.randn(d) * 10)  # a large bias must not leak into any feature's logits
    ti, *_ = logit_lens(W_dec, ln, W_U, k=3)
    ref = ((W_dec - W_dec.mean(1, keepdim=True)) * ln.weight) @ W_U.T
    assert ti.tolist() == ref.topk(3, dim=1).indices.tolist()


def test_neighbours():
    W = torch.randn(6, 8)
    W[4] = 3 * W[1]
    ids, cos = decoder_neighbours(W, k=2)
    assert ids[1, 0] == 4 and cos[1, 0] == pytest.approx(1.0, abs=1e-5) and ids[4, 0] == 1
    cooc = np.array([[0, 5, 1], [5, 0, 0], [1, 0, 0]])
    ids, jac = cooccurrence_neighbours(cooc, np.array([10, 5, 20]), k=2)
    assert ids[0].tolist() == [1, 2] and jac[0, 0] == pytest.approx(5 / 10) and ids[1, 1] == -1


def test_summary_metrics_hand_computed():
    from pipeline.interpret.tables import summary_metrics

    m = summary_metrics(np.array([0, 3, 5, 1]), 100, np.array([0.99, 0.95, 0.6, 0.9]),
                        {"detection_balanced_accuracy@1": np.array([1.0, 0.5, np.nan])}, "stats", 3)
    assert m["alive_features@1"] == 3 and m["interpret_dead_fraction@1"] == 0.25
    assert m["median_topic_auroc@1"] == 0.9  # dead feature 0's 0.99 is ignored
    assert m["frac_topic_auroc_ge_0.9@1"] == pytest.approx(2 / 3)
    assert m["mean_detection_balanced_accuracy@1"] == 0.75 == m["mean_explanation_score@1"]
