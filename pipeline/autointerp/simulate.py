"""A deterministic lexical simulator and the scorers' metrics.

Simulator (used to score ``stats`` explanations, and any explanation when no LM scores): an
explanation names *terms*: its quoted strings ("guitar", "the violin"), or, if it quotes nothing,
its content words. A token is predicted active when it ends an occurrence of a term, compared on
normalised token strings (stripped, lower-cased); unquoted content words also match tokens they
prefix or that prefix them (>= 4 characters: "music" ~ "musical"). It is a crude stand-in for
Bills et al. (2023)'s LM simulator, but deterministic and free, so the ``stats`` explainer can be
scored at all, and a planted perfect explanation scores near 1 while a wrong one scores near chance.

Scorers (EleutherAI delphi's detection and fuzzing, Paulo et al. 2024, "Automatically interpreting
millions of features in LLMs"):

- ``detection_*@1``: activating (held-out) vs non-activating contexts; each context gets a score
  (simulator: number of predicted-active tokens; LM: P(yes)); prediction = score > threshold
  (0 for the simulator, 0.5 for an LM). Balanced accuracy = (TPR + TNR) / 2; F1 of the activating
  class; AUC = P(score_pos > score_neg) + 0.5 P(tie).
- ``fuzzing_*@2``: each held-out activating context is shown (the window the LM prompt renders:
  24 tokens before its most active token, 8 after) twice: with its k most active tokens
  highlighted (correct) and with k random non-activating tokens of the same window highlighted
  (wrong), k = min(active tokens, silent tokens in the window, 8); a context with k = 0 is skipped.
  The score is the fraction of highlighted tokens the simulator predicts active from the window's
  tokens alone (LM: P(yes) that the highlighting fits); prediction = score > 0.5; balanced accuracy,
  F1 and AUC as above. ``fuzzing_*@1`` drew both from the whole 128-token context: ~60% of wrong
  excerpts then showed no highlight at all, so an LM could answer No from that alone.
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.autointerp.explain import window

DETECTION_VERSION = 1
FUZZING_VERSION = 2  # @1: highlights drawn outside the rendered window (see the module docstring)

_STOP = set("""a an the of and or in on at to for from by with as is are was were be been being it its this that
these those which who whom what when where why how not no yes than then so such into onto about over under
after before between through during without within along across feature fires fire firing activates active
activating tokens token words word text texts mostly often usually mainly related relating topic like e g
i e any some many much more most other also only just very can may might""".split())
_QUOTED = re.compile(r"[\"“”«»]([^\"“”«»]{1,60})[\"“”«»]")


def normalise(s: str) -> str:
    return s.strip().lower()


def explanation_terms(explanation: str) -> tuple[list[list[str]], bool]:
    """-> (terms as word lists, fuzzy): quoted phrases exactly, else content words (fuzzy prefix match)."""
    quoted = [q.strip().lower().split() for q in _QUOTED.findall(explanation)]
    quoted = [q for q in quoted if q]
    if quoted:
        return quoted, False
    words = [w for w in re.findall(r"[a-z0-9][a-z0-9'\-]*", explanation.lower()) if w not in _STOP and len(w) >= 3]
    return [[w] for w in dict.fromkeys(words)], True


class LexicalSimulator:
    """Predict which tokens an explanation says are active. ``token_norm`` maps token id -> normalised string."""

    def __init__(self, token_norm: dict[int, str]) -> None:
        self.strings = sorted(set(token_norm.values()))
        self.sid = {s: i for i, s in enumerate(self.strings)}
        ids = np.fromiter(token_norm.keys(), dtype=np.int64, count=len(token_norm))
        self.lut = np.full(int(ids.max(initial=0)) + 2, -1, dtype=np.int64)  # token id -> string id
        self.lut[ids] = [self.sid[token_norm[int(i)]] for i in ids]
        self._fuzzy: dict[str, np.ndarray] = {}  # content word -> matching string ids (memoised scan)

    def _word_ids(self, word: str, fuzzy: bool) -> np.ndarray:
        if not fuzzy or len(word) < 4:
            return np.array([self.sid[word]] if word in self.sid else [], dtype=np.int64)
        if word not in self._fuzzy:
            self._fuzzy[word] = self._scan(word)
        return self._fuzzy[word]

    def _scan(self, word: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.strings)
                         if s == word or (len(s) >= 4 and (s.startswith(word) or word.startswith(s)))], dtype=np.int64)

    def predict(self, explanation: str, tokens: np.ndarray) -> np.ndarray:
        """``tokens[n, T]`` (-1 padding) -> predicted-active mask ``[n, T]`` bool."""
        terms, fuzzy = explanation_terms(explanation)
        sid = np.where(tokens >= 0, self.lut[np.clip(tokens, 0, len(self.lut) - 1)], -1)  # [n, T]
        out = np.zeros(tokens.shape, dtype=bool)
        for words in terms:
            hit = np.ones(tokens.shape, dtype=bool)
            for back, w in enumerate(reversed(words)):  # last word at t, the one before at t-1, ...
                m = np.isin(sid, self._word_ids(w, fuzzy)) & (sid >= 0)
                if back:
                    m = np.concatenate([np.zeros((m.shape[0], back), dtype=bool), m[:, :-back]], axis=1)  # m[t] = match at t-back
                hit &= m
            out |= hit
        return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie); NaN when a class is empty."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float, prefix: str,
                   version: int = DETECTION_VERSION) -> dict[str, float]:
    """Balanced accuracy, F1 (positive class) and AUC of ``scores > threshold`` against boolean ``labels``,
    named ``<prefix>_<metric>@<version>``."""
    labels = labels.astype(bool)
    pred = scores > threshold
    tp, fn = int((pred & labels).sum()), int((~pred & labels).sum())
    tn, fp = int((~pred & ~labels).sum()), int((pred & ~labels).sum())
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    tnr = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {f"{prefix}_balanced_accuracy@{version}": (tpr + tnr) / 2, f"{prefix}_f1@{version}": f1,
            f"{prefix}_auc@{version}": auc(scores, labels)}


def fuzz_highlights(acts: np.ndarray, tokens: np.ndarray, seed: int, max_marked: int = 8
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For activating examples ``acts[n, T]``, ``tokens[n, T]`` (-1 padding): masks ``[n, T]``
    (correct, wrong, shown), all highlights inside ``shown``.

    shown: the window each fuzzing prompt renders (:func:`window` around the most active token);
    correct: its k most active tokens; wrong: k random silent real tokens of the same window
    (delphi's fuzzing: the same text, wrongly highlighted), k = min(active, silent, ``max_marked``)
    per row, so both sides of a pair mark as many tokens and a row with k = 0 marks none."""
    rng = np.random.default_rng(seed)
    n, T = acts.shape
    shown = np.zeros((n, T), dtype=bool)
    for i in range(n):
        shown[i, window(tokens[i], acts[i], int(acts[i].argmax()))] = True
    real = shown & (tokens >= 0)
    on, off = real & (acts > 0), real & ~(acts > 0)
    k = np.minimum(np.minimum(on.sum(1), off.sum(1)), max_marked)[:, None]  # [n, 1]
    col = np.arange(T)[None, :]
    correct = np.zeros((n, T), dtype=bool)
    np.put_along_axis(correct, np.argsort(np.where(on, -acts, np.inf), axis=1, kind="stable"), col < k, axis=1)
    keys = rng.random((n, T))  # random silent tokens of the window: the smallest keys among them
    keys[~off] = np.inf
    wrong = np.zeros((n, T), dtype=bool)
    np.put_along_axis(wrong, np.argsort(keys, axis=1, kind="stable"), col < k, axis=1)
    return correct, wrong, shown


def simulate_scores(sim: LexicalSimulator, explanation: str, pos_tokens: np.ndarray, neg_tokens: np.ndarray,
                    pos_acts: np.ndarray, seed: int) -> dict[str, float]:
    """Detection and fuzzing metrics of ``explanation`` with the lexical simulator."""
    det_tokens = np.concatenate([pos_tokens, neg_tokens]) if len(neg_tokens) else pos_tokens
    det = sim.predict(explanation, det_tokens).sum(1).astype(np.float64)
    labels = np.arange(len(det_tokens)) < len(pos_tokens)
    out = binary_metrics(det, labels, 0.0, "detection")
    correct, wrong, shown = fuzz_highlights(pos_acts, pos_tokens, seed)
    pred = sim.predict(explanation, np.where(shown, pos_tokens, -1))  # the window only, as an LM sees it
    ok = correct.any(1)
    frac = lambda m: (pred & m).sum(1) / np.maximum(m.sum(1), 1)  # noqa: E731
    fz = np.concatenate([frac(correct)[ok], frac(wrong)[ok]])
    fl = np.arange(len(fz)) < int(ok.sum())
    out.update(binary_metrics(fz, fl, 0.5, "fuzzing", FUZZING_VERSION))
    return out
