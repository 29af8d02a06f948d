"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"; SAEBench's
``absorption_first_letter`` eval), from activations at the word's token.

Recipe, with SAEBench's constants:

1. Ground truth: per letter, a one-vs-rest logistic probe (classes balanced) on the hook's activations
   of the train words; a letter is *present* in the model when its probe's test F1 exceeds 0.6.
2. k-sparse probes on the SAE latents: an L1-penalised multi-probe ranks latents by their (signed)
   weight for each letter; for k = 1..10 a logistic probe on the top k; the letter's *main* latents are
   the top-k set of the last k whose test F1 rose by more than 0.03 over the previous best
   (feature splitting when k > 1).
3. On test words of the letter that the ground-truth probe gets right: with a the probe direction
   (unit norm), each latent's projection is act_i * cos(W_dec[i], a), the activation's is x . a.
   Absorption fraction: 0 when the main latents' projection reaches x . a or the top three other latents
   with cos >= 0.1 and a positive projection explain less than 40% of it; 1 when the main latents'
   projection is <= 0; otherwise the absorbers' share min(absorbers, unexplained) / (that + main).
   Full absorption: no main latent fires, the top-projecting latent has cos >= 0.025, x . a > 0 and that
   latent carries >= 40% of x . a.
4. Per letter: mean absorption fraction and full-absorption rate over the probe's true positives; the
   eval's numbers are the means over present letters, reported only when at least ``min_letters`` are.
"""

from __future__ import annotations

import logging
import statistics
import string
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

LETTERS = string.ascii_lowercase
MIN_PROBE_F1 = 0.6
F1_JUMP = 0.03
MAX_K = 10
FULL_COS = 0.025  # FULL_ABSORPTION_PROBE_COS_THRESHOLD
FRACTION_COS = 0.1  # ABSORPTION_FRACTION_PROBE_COS_THRESHOLD
PROJECTION_SHARE = 0.4  # ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD
MAX_ABSORBERS = 3  # ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS
EPS = 1e-8


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    """F1 of boolean predictions ``pred[n]`` against ``y[n]`` (0 when there is no true positive)."""
    tp = float(np.sum(y & pred))
    if tp == 0:
        return 0.0
    return 2 * tp / (2 * tp + float(np.sum(~y & pred)) + float(np.sum(y & ~pred)))


def _logistic(X: np.ndarray, y: np.ndarray, seed: int, c: float = 1.0):  # -> LogisticRegression
    from sklearn.linear_model import LogisticRegression

    # liblinear: SAEBench fits these with lbfgs (same objective bar the intercept's penalty), ~50x slower here
    clf = LogisticRegression(C=c, solver="liblinear", max_iter=500, class_weight="balanced", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(X, y)
    return clf


def ground_truth_probe(x_train: np.ndarray, letter_train: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-letter one-vs-rest probes on activations: ``(W[26, d], b[26])`` in raw activation space.

    Inputs are divided by their mean norm for the solver (one scalar, so directions are unchanged); a
    letter absent from the train words gets a zero row."""
    scale = float(np.linalg.norm(x_train, axis=1).mean()) or 1.0
    W = np.zeros((len(LETTERS), x_train.shape[1]))
    b = np.full(len(LETTERS), -1.0)
    for i in range(len(LETTERS)):
        y = letter_train == i
        if y.any() and (~y).any():
            clf = _logistic(x_train / scale, y.astype(np.int64), seed)
            W[i], b[i] = clf.coef_[0] / scale, clf.intercept_[0]
    return W, b


def l1_latent_ranking(z_train: np.ndarray, letter_train: np.ndarray, seed: int, l1: float = 0.01,
                      epochs: int = 50, lr: float = 0.01) -> np.ndarray:
    """SAEBench's k-sparse selection: one multi-probe on latents (BCE with balanced positive weights,
    + ``l1`` x mean over letters of the weights' L1 norm, Adam, full batch), latents ranked per letter by
    signed weight (they must predict the letter, not its absence). Returns ``[26, d_sae]`` latent ids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(z_train).float()
    y = torch.nn.functional.one_hot(torch.from_numpy(letter_train).long(), len(LETTERS)).float()  # [n, 26]
    pos = y.sum(0)
    pos_weight = (len(y) - pos) / pos.clamp(min=1)
    W = (torch.randn(len(LETTERS), x.shape[1], generator=g) / x.shape[1] ** 0.5).requires_grad_()
    b = torch.zeros(len(LETTERS), requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=1e-6)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(x @ W.T + b, y) + l1 * W.abs().sum(-1).mean()
        loss.backward()
        opt.step()
    return torch.argsort(W.detach(), dim=1, descending=True, stable=True).numpy()


def split_features(f1_by_k: list[float], feats_by_k: list[list[int]], jump: float = F1_JUMP) -> list[int]:
    """SAEBench's feature-splitting rule: walk k = 1, 2, ...; keep k's latents while its F1 beats the best
    so far by more than ``jump``; stop at the first k that does not."""
    best, chosen = -100.0, []
    for score, feats in zip(f1_by_k, feats_by_k, strict=True):
        if score > best + jump:
            best, chosen = score, feats
        else:
            break
    return chosen


@dataclass
class WordScore:
    absorption_fraction: float
    full_absorption: bool


def score_word(x: np.ndarray, z: np.ndarray, cos: np.ndarray, probe_dir: np.ndarray, main: list[int]) -> WordScore:
    """Absorption of one word (step 3 of the module docstring).

    :param x: ``[d]`` activation; :param z: ``[d_sae]`` its latents; :param cos: ``[d_sae]`` cosine of every
        decoder row with the probe; :param probe_dir: ``[d]`` unit probe direction; :param main: main latents
    """
    act_proj = float(x @ probe_dir)
    proj = z * cos  # [d_sae] each latent's projection onto the probe
    main_proj = float(proj[main].sum()) if main else 0.0
    others = np.ones(len(z), dtype=bool)
    others[main] = False
    others &= (cos >= FRACTION_COS) & (proj > 0)
    absorbers = np.sort(proj[others])[::-1][:MAX_ABSORBERS]
    absorbers_total = float(absorbers.sum())
    share = absorbers_total / act_proj if act_proj != 0 else 0.0
    if main_proj >= act_proj or share < PROJECTION_SHARE:
        fraction = 0.0
    elif main_proj <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(absorbers_total, act_proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(np.argsort(-proj, kind="stable")[0])
    full = (all(z[i] < EPS for i in main) and cos[top] >= FULL_COS and act_proj >= 0
            and proj[top] / act_proj >= PROJECTION_SHARE if act_proj > 0 else False)
    return WordScore(fraction, bool(full))


def absorption(x_train: np.ndarray, letter_train: np.ndarray, x_test: np.ndarray, letter_test: np.ndarray,
               encode: Callable[[np.ndarray], np.ndarray], W_dec: np.ndarray, seed: int,
               min_letters: int) -> dict:
    """The whole eval on word activations ``x_*[n, d]`` with first-letter indices ``letter_*[n]``.

    :param encode: ``x[n, d] -> z[n, d_sae]``; :param W_dec: ``[d_sae, d]``
    :return: ``{"letters": {letter: {...}}, "n_present": n, "mean": {...} or None, "note": str or None}``
    """
    W, b = ground_truth_probe(x_train, letter_train, seed)
    letters: dict[str, dict] = {}
    for i, letter in enumerate(LETTERS):
        y_tr, y_te = letter_train == i, letter_test == i
        if y_tr.any() and y_te.any():
            probe_pos = (x_test @ W[i] + b[i]) > 0
            letters[letter] = {"probe_f1": f1(y_te, probe_pos), "num_probe_true_positives": int(np.sum(y_te & probe_pos))}
            letters[letter]["present"] = letters[letter]["probe_f1"] > MIN_PROBE_F1 and letters[letter]["num_probe_true_positives"] > 0
    n_present = sum(v["present"] for v in letters.values())
    out: dict = {"letters": letters, "n_present": n_present, "mean": None, "note": None}
    if n_present < max(min_letters, 2):  # nothing below needs computing: no number will be reported
        out["note"] = (f"absorption not evaluated: {n_present} of 26 letters have a ground-truth probe with test "
                       f"F1 > {MIN_PROBE_F1} (needs {max(min_letters, 2)}); the model does not represent first letters "
                       f"linearly enough at this hook")
        return out
    z_train, z_test = encode(x_train), encode(x_test)
    ranking = l1_latent_ranking(z_train, letter_train, seed)
    dec_unit = W_dec / (np.linalg.norm(W_dec, axis=1, keepdims=True) + EPS)
    for letter, v in letters.items():
        if not v["present"]:  # SAEBench computes these for every letter but reports only present ones
            continue
        i = LETTERS.index(letter)
        y_tr, y_te = letter_train == i, letter_test == i
        f1s, feats = [], []
        for k in range(1, MAX_K + 1):
            cols = ranking[i, :k].tolist()
            clf = _logistic(z_train[:, cols], y_tr.astype(np.int64), seed)
            f1s.append(f1(y_te, clf.decision_function(z_test[:, cols]) > 0))
            feats.append(cols)
        main = split_features(f1s, feats)
        direction = W[i] / (np.linalg.norm(W[i]) + EPS)
        cos = dec_unit @ direction
        true_pos = np.flatnonzero(y_te & ((x_test @ W[i] + b[i]) > 0))
        scores = [score_word(x_test[j], z_test[j], cos, direction, main) for j in true_pos]
        n = len(true_pos)
        v.update({"sparse_f1": f1s, "split_feats": main, "num_full_absorption": int(sum(s.full_absorption for s in scores)),
                  "mean_absorption_fraction": sum(s.absorption_fraction for s in scores) / n,
                  "full_absorption_rate": sum(s.full_absorption for s in scores) / n})
    present = [v for v in letters.values() if v["present"]]
    fr = [v["mean_absorption_fraction"] for v in present]
    full = [v["full_absorption_rate"] for v in present]
    nsplit = [len(v["split_feats"]) for v in present]
    out["mean"] = {
        "mean_absorption_fraction_score": statistics.mean(fr), "mean_full_absorption_score": statistics.mean(full),
        "mean_num_split_features": statistics.mean(nsplit), "std_dev_absorption_fraction_score": statistics.stdev(fr),
        "std_dev_full_absorption_score": statistics.stdev(full), "std_dev_num_split_features": statistics.stdev(nsplit),
    }
    return out


__all__ = ["LETTERS", "f1", "ground_truth_probe", "l1_latent_ranking", "split_features", "score_word", "absorption"]
