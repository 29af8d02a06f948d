"""Explain-then-score for one feature, with the ``stats`` explainer + simulator or with an LM backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.autointerp.backends import Backend, Cached, LocalChat, OpenAIChat
from pipeline.autointerp.explain import (
    PROMPT_VERSION,
    SCORE_PROMPT_VERSION,
    Evidence,
    detection_messages,
    explain_messages,
    fuzzing_messages,
    render,
    stats_explanation,
    window,
)
from pipeline.autointerp.simulate import (
    FUZZING_VERSION,
    LexicalSimulator,
    binary_metrics,
    fuzz_highlights,
    simulate_scores,
)


def make_backend(spec: str, cache_dir: Path, *, base_url: str, api_key_env: str, max_retries: int,
                 timeout: float, device: str = "cpu", backoff: float = 1.0, version: str | None = None,
                 key: str = "interpret.explainer") -> Cached | None:
    """A backend spec -> a cached LM backend; None for the no-LM specs ``stats`` and ``none``.

    ``spec`` is ``local:<model>`` or ``openai:<model>`` (``interpret.explainer``, ``steer.judge``);
    ``version`` keys the cache (default: the interpretation prompts' versions), so a prompt change
    never reuses stale answers; ``key`` names the param in error messages.
    """
    if spec in ("stats", "none"):
        return None
    kind, _, model = spec.partition(":")
    backend: Backend
    if kind == "local":
        backend = LocalChat(model, device=device, key=key)
    else:
        backend = OpenAIChat(model, base_url, os.environ.get(api_key_env) or None, max_retries, timeout, backoff)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)
    return Cached(backend, Path(cache_dir) / f"{safe}.jsonl", version or f"{PROMPT_VERSION}/{SCORE_PROMPT_VERSION}")


def stats_explain_and_score(ev: Evidence, norm: dict[int, str], sim: LexicalSimulator, seed: int) -> dict[str, Any]:
    """The ``stats`` explanation of a feature and its simulator scores."""
    expl = stats_explanation(ev, norm)
    out: dict[str, Any] = {"explanation": expl, "explainer": "stats", "scorer": "simulator"}
    if len(ev.pos_tokens):
        out.update(simulate_scores(sim, expl, ev.pos_tokens, ev.neg_tokens, ev.pos_acts, seed + ev.feature))
    return out


def _neg_center(tokens: np.ndarray, seed: int) -> int:
    n = int((tokens >= 0).sum())
    return int(np.random.default_rng(seed).integers(min(n - 1, 24), max(n, 25))) if n > 1 else 0


def lm_explain_and_score(ev: Evidence, backend: Cached, text: dict[int, str], max_new_tokens: int,
                         seed: int, max_scored: int = 10) -> dict[str, Any]:
    """Explain with the LM from the explainer's examples, then score detection and fuzzing with its P(yes)."""
    expl = backend.generate(explain_messages(ev, text), max_new_tokens)
    out: dict[str, Any] = {"explanation": expl, "explainer": backend.name, "scorer": backend.name}
    if not len(ev.pos_tokens):
        return out
    # LM forward passes dominate the cost: score an evenly spaced subset of the held-out positives
    # (it spans the odd top ranks and the quantiles) and as many negatives.
    keep = np.unique(np.linspace(0, len(ev.pos_tokens) - 1, min(max_scored, len(ev.pos_tokens))).round().astype(int))
    pos_tokens, pos_acts = ev.pos_tokens[keep], ev.pos_acts[keep]
    neg_tokens = ev.neg_tokens[:max_scored]
    excerpts, labels = [], []
    for t, a in zip(pos_tokens, pos_acts, strict=True):
        sl = window(t, a, int(a.argmax()))
        excerpts.append(render(t[sl], np.zeros(len(t[sl]), bool), text))
        labels.append(True)
    for i, t in enumerate(neg_tokens):
        sl = window(t, None, _neg_center(t, seed + 31 * ev.feature + i))
        excerpts.append(render(t[sl], np.zeros(len(t[sl]), bool), text))
        labels.append(False)
    det = np.array(backend.yes_probs([detection_messages(expl, e) for e in excerpts]))
    out.update(binary_metrics(det, np.array(labels), 0.5, "detection"))
    correct, wrong, shown = fuzz_highlights(pos_acts, pos_tokens, seed + ev.feature)
    prompts, fl = [], []
    for t, c, w, s in zip(pos_tokens, correct, wrong, shown, strict=True):
        if not c.any():
            continue
        for marks, label in ((c, True), (w, False)):
            prompts.append(fuzzing_messages(expl, render(t[s], marks[s], text)))  # t[s]: the window, in order
            fl.append(label)
    fz = backend.yes_probs(prompts)
    out.update(binary_metrics(np.array(fz), np.array(fl), 0.5, "fuzzing", FUZZING_VERSION))
    return out
