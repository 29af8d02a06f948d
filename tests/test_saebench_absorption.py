"""Feature absorption (pipeline/saebench/absorption.py, words.py): hand-computed word scores, the
feature-splitting rule, and planted absorption -- a dictionary whose parent latents are absorbed by
word-specific latents on half the words scores high, a clean one low."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.saebench import absorption as ab
from pipeline.saebench import words


def test_score_word_partial_absorption_by_hand():
    # probe a = e0; x . a = 2; main latent 0 fires 0.5 (cos 1), latent 1 fires 2 (cos 0.5).
    # projections: main 0.5, absorber 1.0 (share 1/2 >= 0.4) -> absorbed min(1.0, 2 - 0.5) = 1.0
    # fraction 1.0 / (1.0 + 0.5) = 2/3; the main latent fired, so no full absorption.
    s = ab.score_word(np.array([2.0, 0.0]), np.array([0.5, 2.0]), np.array([1.0, 0.5]), np.array([1.0, 0.0]), [0])
    assert s.absorption_fraction == pytest.approx(2 / 3)
    assert not s.full_absorption


def test_score_word_full_absorption_by_hand():
    # main silent; latent 1: 2 x cos 0.8 = 1.6 of x . a = 2 (80% >= 40%), cos >= 0.025 -> full, fraction 1.
    s = ab.score_word(np.array([2.0, 0.0]), np.array([0.0, 2.0]), np.array([1.0, 0.8]), np.array([1.0, 0.0]), [0])
    assert s.absorption_fraction == 1.0 and s.full_absorption


def test_score_word_wrong_sign_mutation_fails():
    """Mutation: projecting with the opposite sign (z * -cos) leaves no absorber; the hand value is 2/3."""
    x, z, cos, a = np.array([2.0, 0.0]), np.array([0.5, 2.0]), np.array([1.0, 0.5]), np.array([1.0, 0.0])
    assert ab.score_word(x, z, -cos, a, [0]).absorption_fraction != pytest.approx(2 / 3)
    assert ab.score_word(x, z, cos, a, [0]).absorption_fraction == pytest.approx(2 / 3)


def test_score_word_no_absorber_weak_share():
    # absorber carries 0.3 of x . a = 2 (15% < 40%) -> 0, whatever the main latents do.
    s = ab.score_word(np.array([2.0, 0.0]), np.array([0.0, 0.6]), np.array([1.0, 0.5]), np.array([1.0, 0.0]), [0])
    assert s.absorption_fraction == 0.0 and not s.full_absorption


def test_split_features_jump_rule():
    feats = [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]
    assert ab.split_features([0.5, 0.6, 0.62, 0.9], feats) == [1, 2]  # 0.62 is not > 0.6 + 0.03: stop there
    assert ab.split_features([0.5, 0.52, 0.9, 0.95], feats) == [1]


def test_f1_by_hand():
    y = np.array([1, 1, 0, 0], bool)
    assert ab.f1(y, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)  # tp 1, fp 1, fn 1
    assert ab.f1(y, np.zeros(4, bool)) == 0.0


def _planted(absorbed: bool, seed: int = 0, per_letter: int = 30, d_extra: int = 100):
    """26 letters, orthogonal letter directions e_L; half the words of every letter are "child" words with
    their own direction u_w. The absorbed dictionary's letter latent is silent on child words and a
    word-specific latent (decoder along 3 e_L + 2 u_w) carries the letter instead; the clean one's letter
    latent fires on every word of its letter."""
    rng = np.random.default_rng(seed)
    n_l, d = 26, 26 + d_extra
    letters = np.repeat(np.arange(n_l), per_letter)
    child = np.tile(np.arange(per_letter) % 2 == 1, n_l)
    U = rng.normal(size=(child.sum(), d_extra))
    U = np.concatenate([np.zeros((len(U), n_l)), U / np.linalg.norm(U, axis=1, keepdims=True)], axis=1)
    E = np.eye(d)[:n_l]
    X = 3 * E[letters] + rng.normal(0, 0.05, (len(letters), d))
    X[child] += 2 * U
    child_letter = letters[child]
    W_dec = np.concatenate([E, (3 * E[child_letter] + 2 * U) / np.sqrt(13)])  # [26 + n_child, d]

    def encode(x: np.ndarray) -> np.ndarray:
        u = np.maximum(x @ U.T, 0)  # [n, n_child]
        is_child = u.max(1) > 1.0
        parent = np.maximum(x @ E.T, 0)  # [n, 26]
        if absorbed:
            parent = parent * ~is_child[:, None]
            kids = np.where(u > 1.0, u * np.sqrt(13) / 2, 0.0)  # the word's latent reconstructs it
        else:
            kids = np.zeros_like(u)
        return np.concatenate([parent, kids], axis=1)

    test = np.tile(np.arange(per_letter) >= per_letter * 2 // 3, n_l)
    return X[~test], letters[~test], X[test], letters[test], encode, W_dec


@pytest.mark.parametrize("absorbed", [True, False])
def test_planted_absorption(absorbed: bool):
    xtr, ltr, xte, lte, encode, W_dec = _planted(absorbed)
    res = ab.absorption(xtr, ltr, xte, lte, encode, W_dec, seed=0, min_letters=20)
    assert res["n_present"] == 26 and res["note"] is None
    score = res["mean"]["mean_absorption_fraction_score"]
    full = res["mean"]["mean_full_absorption_score"]
    if absorbed:  # half the test words are absorbed
        assert score > 0.35 and full > 0.35
    else:
        assert score < 0.05 and full < 0.05


def test_too_few_letters_gives_a_note_not_a_number():
    xtr, ltr, xte, lte, encode, W_dec = _planted(True)
    keep_tr, keep_te = ltr < 3, lte < 3  # only a, b, c have words
    res = ab.absorption(xtr[keep_tr], ltr[keep_tr], xte[keep_te], lte[keep_te], encode, W_dec, seed=0, min_letters=20)
    assert res["mean"] is None and res["n_present"] == 3
    assert "3 of 26 letters" in res["note"] and "\n" not in res["note"]


def test_word_position_is_computed_for_the_tokenizer(tiny_llama):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    prompts = words.make_prompts(["cat", "zebra"], ["dog", "apple", "house", "river"], seed=0)
    assert prompts[0].text.endswith("\ncat has the first letter:") and prompts[0].text.count("\n") == 5
    ids, pos = words.word_positions(tok, prompts, add_bos=True)
    for p, i, j in zip(prompts, ids, pos, strict=True):
        word = p.text[p.word_end - len("cat" if p.letter == 2 else "zebra"):p.word_end]
        assert tok.decode(i[j]).strip() and word.endswith(tok.decode(i[j]).strip()[-1])
        assert tok.decode(i[j + 1:]).strip() == "has the first letter:"
