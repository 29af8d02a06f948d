"""Automated interpretability: explain each feature, then score the explanation on held-out examples.

Explainers: ``stats`` (deterministic, no LM), ``local:<model>``, ``openai:<model>``; scorers:
detection and fuzzing (EleutherAI delphi; Paulo et al. 2024), with a lexical simulator when no LM
scores. See ``explain``, ``simulate``, ``backends`` and ``run``.
"""

from __future__ import annotations

from pipeline.autointerp.explain import (
    PROMPT_VERSION,
    SCORE_PROMPT_VERSION,
    Evidence,
    split_evidence,
    stats_explanation,
)
from pipeline.autointerp.run import lm_explain_and_score, make_backend, stats_explain_and_score
from pipeline.autointerp.simulate import LexicalSimulator, binary_metrics, simulate_scores

__all__ = [
    "PROMPT_VERSION", "SCORE_PROMPT_VERSION", "Evidence", "split_evidence", "stats_explanation",
    "lm_explain_and_score", "make_backend", "stats_explain_and_score", "LexicalSimulator", "binary_metrics",
    "simulate_scores",
]
