"""k-sparse probing (SAEBench's ``sparse_probing``, Karvonen et al. 2025; Gurnee et al. 2023) on pooled documents.

One binary task per corpus label: positives are the label's documents, negatives as many documents
drawn evenly from the other labels, in each probe split. For each k:

- ``sae_top_k``: the k latents with the largest |mean(pos) - mean(neg)| on the *train* split, then a
  logistic regression (scikit-learn, C = 1, as SAEBench) on those latents; accuracy on test.
- ``llm_top_k``: the same selection on the raw activation channels (the baseline).
- ``sae_l1_top_k`` / ``llm_l1_top_k``: the k inputs an L1-penalised logistic regression picks first as
  its penalty is relaxed (order of entry along a regularisation path fitted on train), the selection
  of the ``sae-probes`` style of evaluation, then the same logistic regression.
- ``sae`` / ``llm`` (full width): logistic regression on every latent / channel with C chosen on the
  *validation* split (SAEBench early-stops its full probes on the test set; here test picks nothing).

Every accuracy comes with a 95% percentile bootstrap interval over test documents (resampled within
each task; the mean over labels resamples every task at once).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from pipeline.saebench.pooling import TEST, TRAIN, VALIDATION

log = logging.getLogger(__name__)

FULL_CS = (0.01, 0.1, 1.0)  # C grid of the full-width probes, chosen on validation
L1_CS = tuple(float(c) for c in np.logspace(-2, 1, 7))  # regularisation path of the L1 selection


@dataclass
class Task:
    """One one-vs-rest task: row indices into the pooled arrays and 0/1 targets, per probe split."""

    label: str
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    y: dict[int, np.ndarray] = field(default_factory=dict)


def make_tasks(labels: np.ndarray, split: np.ndarray, seed: int) -> list[Task]:
    """One task per label with at least one positive in every probe split; negatives as many as the
    positives of that split, drawn evenly (round-robin over a seeded order) from the other labels."""
    rng = np.random.default_rng(seed + 2)
    names = sorted(set(labels.tolist()))
    tasks: list[Task] = []
    for lab in names:
        task = Task(lab)
        for s in (TRAIN, VALIDATION, TEST):
            pos = np.flatnonzero((labels == lab) & (split == s))
            pools = [rng.permutation(np.flatnonzero((labels == o) & (split == s))).tolist() for o in names if o != lab]
            neg: list[int] = []
            while len(neg) < len(pos) and any(pools):
                for p in pools:
                    if p and len(neg) < len(pos):
                        neg.append(p.pop())
            task.rows[s] = np.concatenate([pos, np.asarray(neg, dtype=np.int64)])
            task.y[s] = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
        if all(len(task.y[s]) and task.y[s].min() == 0 and task.y[s].max() == 1 for s in (TRAIN, VALIDATION, TEST)):
            tasks.append(task)
        else:
            log.warning("sparse probing: label %r skipped (too few documents for train/validation/test)", lab)
    return tasks


def mean_diff_order(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inputs by |mean over positives - mean over negatives|, largest first (stable on ties).

    :param X: ``[n, d]`` train inputs; :param y: ``[n]`` 0/1
    """
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")


def l1_order(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Inputs in the order an L1-penalised logistic regression admits them as C grows over :data:`L1_CS`
    (ties: larger |coefficient| at entry first); inputs never admitted follow in :func:`mean_diff_order`."""
    from sklearn.linear_model import LogisticRegression

    scale = X.std(0) + 1e-8  # standardised so the penalty treats inputs alike; entry order is what counts
    Xs = (X - X.mean(0)) / scale
    entered: dict[int, tuple[int, float]] = {}
    for step, c in enumerate(L1_CS):
        clf = LogisticRegression(penalty="l1", solver="liblinear", C=c, max_iter=1000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(Xs, y)
        for j in np.flatnonzero(clf.coef_[0]):
            entered.setdefault(int(j), (step, -abs(float(clf.coef_[0][j]))))
    first = sorted(entered, key=lambda j: (*entered[j], j))
    rest = [int(j) for j in mean_diff_order(X, y) if int(j) not in entered]
    return np.asarray(first + rest, dtype=np.int64)


def _fit(X: np.ndarray, y: np.ndarray, c: float, seed: int):  # -> LogisticRegression
    """L2-penalised logistic regression. liblinear (SAEBench: lbfgs, the same objective but for liblinear's
    penalised intercept): its dual form is ~20x faster when inputs outnumber documents, the full SAE probe's case."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, solver="liblinear", dual=X.shape[1] > X.shape[0], max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on separable data: the accuracy is what counts
        clf.fit(X, y)
    return clf


def correct_k(X: np.ndarray, task: Task, order: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Per test document: 1.0 if the probe on the first ``k`` inputs of ``order`` classifies it right."""
    cols = order[:k]
    clf = _fit(X[task.rows[TRAIN]][:, cols], task.y[TRAIN], 1.0, seed)
    return (clf.predict(X[task.rows[TEST]][:, cols]) == task.y[TEST]).astype(np.float64)


def correct_full(X: np.ndarray, task: Task, seed: int) -> tuple[np.ndarray, float]:
    """Full-width probe, C chosen by validation accuracy (ties: the stronger penalty); per-test-doc correctness, C."""
    best: tuple[float, float, object] | None = None
    for c in FULL_CS:
        clf = _fit(X[task.rows[TRAIN]], task.y[TRAIN], c, seed)
        acc = float((clf.predict(X[task.rows[VALIDATION]]) == task.y[VALIDATION]).mean())
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    assert best is not None
    return (best[2].predict(X[task.rows[TEST]]) == task.y[TEST]).astype(np.float64), best[1]


def bootstrap(correct: dict[str, np.ndarray], draws: dict[str, np.ndarray]) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """95% percentile intervals of each task's accuracy and of their mean over tasks.

    :param correct: ``{label: [n_test] 0/1}``; :param draws: ``{label: [B, n_test] int}`` resampled indices
        (shared by every metric, so intervals of different metrics are paired)
    """
    per = {lab: correct[lab][draws[lab]].mean(1) for lab in correct}  # [B] each
    ci = {lab: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for lab, v in per.items()}
    mean = np.mean(np.stack(list(per.values())), axis=0)
    return ci, (float(np.percentile(mean, 2.5)), float(np.percentile(mean, 97.5)))


def sparse_probing(llm: np.ndarray, sae: np.ndarray, labels: np.ndarray, split: np.ndarray, ks: list[int],
                   seed: int, n_bootstrap: int) -> dict:
    """Every accuracy of the module docstring, per label and averaged, with bootstrap intervals.

    :param llm: ``[D, d_model]`` pooled activations; :param sae: ``[D, d_sae]`` pooled latents;
    :param labels: ``[D]``; :param split: ``[D]`` probe split codes
    :return: ``{"mean": {name: acc}, "ci": {name: [lo, hi]}, "per_label": {label: {name: acc}},
        "per_label_ci": {label: {name: [lo, hi]}}, "n_test": {label: n}, "full_C": {label: {sae, llm}}}``;
        names without version (``sae_top_1_test_accuracy``); ks above an input width are skipped
    """
    tasks = make_tasks(labels, split, seed)
    if not tasks:
        raise ValueError("no label has documents in all three probe splits")
    rng = np.random.default_rng(seed + 3)
    draws = {t.label: rng.integers(0, len(t.y[TEST]), size=(n_bootstrap, len(t.y[TEST]))) for t in tasks}
    correct: dict[str, dict[str, np.ndarray]] = {}
    full_c: dict[str, dict[str, float]] = {}
    for t in tasks:
        got: dict[str, np.ndarray] = {}
        for src, X in (("sae", sae), ("llm", llm)):
            Xtr = X[t.rows[TRAIN]]
            orders = {f"{src}_top": mean_diff_order(Xtr, t.y[TRAIN]), f"{src}_l1_top": l1_order(Xtr, t.y[TRAIN], seed)}
            for prefix, order in orders.items():
                for k in ks:
                    if k <= X.shape[1]:
                        got[f"{prefix}_{k}_test_accuracy"] = correct_k(X, t, order, k, seed)
            got[f"{src}_test_accuracy"], c = correct_full(X, t, seed)
            full_c.setdefault(t.label, {})[src] = c
        correct[t.label] = got
        log.info("sparse probing %s: sae_top_1 %.3f, llm_top_1 %.3f, sae %.3f, llm %.3f", t.label,
                 got["sae_top_1_test_accuracy"].mean() if "sae_top_1_test_accuracy" in got else float("nan"),
                 got["llm_top_1_test_accuracy"].mean() if "llm_top_1_test_accuracy" in got else float("nan"),
                 got["sae_test_accuracy"].mean(), got["llm_test_accuracy"].mean())
    names = list(correct[tasks[0].label])
    out: dict = {"mean": {}, "ci": {}, "per_label": {t.label: {} for t in tasks},
                 "per_label_ci": {t.label: {} for t in tasks}, "n_test": {t.label: int(len(t.y[TEST])) for t in tasks},
                 "full_C": full_c}
    for name in names:
        per = {lab: correct[lab][name] for lab in correct}
        ci, mean_ci = bootstrap(per, draws)
        out["mean"][name] = float(np.mean([v.mean() for v in per.values()]))
        out["ci"][name] = list(mean_ci)
        for lab, v in per.items():
            out["per_label"][lab][name] = float(v.mean())
            out["per_label_ci"][lab][name] = list(ci[lab])
    return out


__all__ = ["Task", "make_tasks", "mean_diff_order", "l1_order", "correct_k", "correct_full", "bootstrap",
           "sparse_probing"]
