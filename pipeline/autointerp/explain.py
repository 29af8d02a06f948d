"""Evidence shown to explainers, the deterministic ``stats`` explainer, and the LM prompts.

Held-out discipline (Bills et al. 2023; Paulo et al. 2024): the explainer sees the *even-ranked*
top contexts only; the scorers see the odd-ranked top contexts plus the quantile-stratified ones
(minus any context the explainer saw) as activating examples, and random contexts where the feature
never fires as non-activating ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROMPT_VERSION = "explain-v1"
SCORE_PROMPT_VERSION = "score-v1"
MARK_L, MARK_R = "<<", ">>"


@dataclass
class Evidence:
    feature: int
    explain_tokens: np.ndarray  # [n, T] int64 (-1 padding)
    explain_acts: np.ndarray  # [n, T] float32
    pos_tokens: np.ndarray  # [p, T] held-out activating contexts
    pos_acts: np.ndarray  # [p, T]
    neg_tokens: np.ndarray  # [q, T] contexts where the feature is silent
    topic: str | None = None
    topic_auroc: float = float("nan")
    promoted: list[str] = field(default_factory=list)


def split_evidence(feature: int, kind: np.ndarray, rank: np.ndarray, ctx: np.ndarray, tokens: np.ndarray,
                   acts: np.ndarray, topic: str | None, topic_auroc: float, promoted: list[str]) -> Evidence:
    """One feature's examples (kind 0 top, 1 quantile, 2 random; ``tokens``/``acts`` ``[E, T]``) -> Evidence."""
    ex = (kind == 0) & (rank % 2 == 0)
    seen = set(ctx[ex].tolist())
    pos = ((kind == 0) & (rank % 2 == 1)) | ((kind == 1) & ~np.isin(ctx, list(seen)))
    pos &= acts.max(1, initial=0) > 0
    _, first = np.unique(ctx[pos], return_index=True)  # a context held out twice counts once
    pidx = np.flatnonzero(pos)[np.sort(first)]
    neg = kind == 2
    return Evidence(feature, tokens[ex], acts[ex], tokens[pidx], acts[pidx], tokens[neg], topic, topic_auroc, promoted)


def _quotable(s: str) -> bool:
    return bool(s) and '"' not in s and len(s) <= 40


def stats_explanation(ev: Evidence, norm: dict[int, str], max_terms: int = 3) -> str:
    """A deterministic explanation from activation mass per token and per (previous, token) bigram.

    Terms: the tokens holding the most activation mass over the explainer's examples (each >= 10% of
    it); a token is quoted with its predecessor when one predecessor carries >= 60% of its mass (an
    n-gram feature). The best topic is appended when its ``topic_auroc@1`` >= 0.8.
    """
    acts, toks = ev.explain_acts, ev.explain_tokens
    on = acts > 0
    mass: dict[int, float] = {}
    pair: dict[tuple[int, int], float] = {}
    prev = np.concatenate([np.full((len(toks), 1), -1), toks[:, :-1]], axis=1)
    for t, p, a in zip(toks[on].tolist(), prev[on].tolist(), acts[on].tolist(), strict=True):
        mass[t] = mass.get(t, 0.0) + a
        pair[(p, t)] = pair.get((p, t), 0.0) + a
    total = sum(mass.values())
    terms: list[str] = []
    for t, m in sorted(mass.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(terms) >= max_terms or m < 0.1 * total:
            break
        s = norm.get(t, "")
        if not _quotable(s):
            continue
        best_p, best_m = max(((p, v) for (p, tt), v in pair.items() if tt == t), key=lambda pv: (pv[1], -pv[0]))
        ps = norm.get(best_p, "")
        if best_m >= 0.6 * m and _quotable(ps) and best_p >= 0:
            s = f"{ps} {s}"
        if s not in terms:
            terms.append(s)
    parts = []
    if terms:
        parts.append("fires on " + ", ".join(f'"{t}"' for t in terms))
    else:
        parts.append("fires diffusely (no dominant token)")
    if ev.topic is not None and ev.topic_auroc >= 0.8:
        parts.append(f"topic: {ev.topic} (AUROC {ev.topic_auroc:.2f})")
    return "; ".join(parts)


def window(tokens: np.ndarray, acts: np.ndarray | None, center: int, before: int = 24, after: int = 8) -> slice:
    """Token window around ``center``, clipped to the context's real tokens."""
    n = int((tokens >= 0).sum())
    return slice(max(0, center - before), min(n, center + after + 1))


def render(tokens: np.ndarray, marks: np.ndarray, text: dict[int, str]) -> str:
    """Concatenate token strings, wrapping marked tokens in <<...>>."""
    out = []
    for t, m in zip(tokens.tolist(), marks.tolist(), strict=True):
        if t < 0:
            continue
        s = text.get(t, "")
        out.append(f"{MARK_L}{s}{MARK_R}" if m else s)
    return "".join(out).replace("\n", " ")


def explain_messages(ev: Evidence, text: dict[int, str], max_examples: int = 10) -> list[dict[str, str]]:
    """Chat messages asking an LM to explain the feature from its explainer examples."""
    lines = []
    for i in range(min(len(ev.explain_tokens), max_examples)):
        a, t = ev.explain_acts[i], ev.explain_tokens[i]
        c = int(a.argmax())
        sl = window(t, a, c)
        marks = a[sl] >= 0.3 * a[c]
        lines.append(f"{i + 1}. {render(t[sl], marks, text)}")
    system = ("You are an interpretability researcher studying one feature of a language model. "
              "You see text excerpts where the feature is active; the tokens where it is most active "
              f"are marked {MARK_L}like this{MARK_R}.")
    user = ("Excerpts:\n" + "\n".join(lines) + "\n\nIn one short phrase, what does this feature respond to? "
            'Put the key words or tokens in double quotes, e.g. fires on "guitar" and "violin" (music).')
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def detection_messages(explanation: str, excerpt: str) -> list[dict[str, str]]:
    user = (f'A language-model feature is explained as: "{explanation}".\n\nText: {excerpt}\n\n'
            "Is this feature active anywhere in the text? Answer Yes or No.")
    return [{"role": "user", "content": user}]


def fuzzing_messages(explanation: str, excerpt: str) -> list[dict[str, str]]:
    user = (f'A language-model feature is explained as: "{explanation}".\n\nIn the text below some tokens are '
            f"marked {MARK_L}like this{MARK_R}.\n\nText: {excerpt}\n\n"
            "Are the marked tokens the ones this feature is active on? Answer Yes or No.")
    return [{"role": "user", "content": user}]
