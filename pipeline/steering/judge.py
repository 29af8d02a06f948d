"""Optional LLM judge of steered generations (``steer.judge``), after AxBench (Wu et al. 2025).

AxBench asks a judge LM three separate questions about each continuation and has it rate each on
0/1/2, explaining before it rates:

- ``judge_concept``     is the concept present (0 absent, 1 minimal or awkward, 2 clearly and naturally)?
- ``judge_instruction`` does the text relate to the instruction (here: the prompt it continues)?
- ``judge_fluency``     is it fluent (0 incomprehensible or repetitive, 1 noticeable errors, 2 fluent)?

and combines them by their harmonic mean ``judge_hm`` (0 when any rating is 0), so that steering
cannot buy concept at the price of fluency or relevance. The judge works on text only, so it is
blind to how the text was steered and fair to the baselines. An answer without a rating is
recorded as None (``judge_hm`` None too) and counted, never guessed.

The prompts are our own wording of AxBench's rubric; bump :data:`PROMPT_VERSION` whenever they change:
it keys the call cache (``autointerp.backends.Cached``), so old answers are never reused.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

__all__ = ["PROMPT_VERSION", "MAX_NEW_TOKENS", "ASPECTS", "JUDGE_COLUMNS", "judge_messages", "parse_rating",
           "harmonic_mean3", "judge_generation", "judge_rows"]

PROMPT_VERSION = "axbench-judge-v1"
MAX_NEW_TOKENS = 128  # room for a one- or two-sentence explanation, then the rating
ASPECTS = ("concept", "instruction", "fluency")
JUDGE_COLUMNS = ("judge_concept", "judge_instruction", "judge_fluency", "judge_hm")

Messages = list[dict[str, str]]


class TextBackend(Protocol):
    name: str

    def generate(self, messages: Messages, max_new_tokens: int) -> str: ...


_SYSTEM = "You are an impartial judge of short text fragments written by a language model."
_FORMAT = ('First explain your reasoning in one or two sentences. Then give the rating as a single digit, '
           'exactly in this format: "Rating: [[N]]" with N = 0, 1 or 2.')
_RUBRIC = {
    "concept": (
        "Judge whether the concept below appears in the text fragment. Consider only whether the concept "
        "is incorporated, not grammar or logic. Rate 0 if the concept is absent, 1 if it is present but only "
        "minimally or awkwardly, 2 if it is clearly and naturally part of the text."),
    "instruction": (
        "Judge whether the text fragment relates to the instruction below (the fragment may be a "
        "continuation of it). Consider only how related the topic is, not grammar, coherence or quality. "
        "Rate 0 if the fragment is unrelated to the instruction, 1 if it is only loosely or indirectly "
        "related, 2 if it is clearly and directly related."),
    "fluency": (
        "Judge the fluency of the text fragment below. Consider only fluency, not completeness, relevance "
        "or informativeness; the fragment may stop mid-sentence. Rate 0 if it is not fluent (incomprehensible, "
        "ungrammatical or repetitive), 1 if it is somewhat fluent with noticeable errors or awkward phrasing, "
        "2 if it is fluent and natural."),
}


def judge_messages(aspect: str, concept: str, instruction: str, continuation: str) -> Messages:
    """Chat messages asking for one aspect's 0-2 rating (``aspect`` in :data:`ASPECTS`)."""
    parts = [_RUBRIC[aspect], _FORMAT, ""]
    if aspect == "concept":
        parts += [f"Concept: {concept.strip()}", ""]
    elif aspect == "instruction":
        parts += [f"Instruction: {instruction.strip()}", ""]
    parts.append(f"Text fragment: {continuation.strip()}")
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


# "Rating: 2", "**Rating**: [1]", "rating: [[0]]", "Rating of 2", "Score = (1)"; the digit must stand
# alone ("Rating: 10" or "Rating: 1.5" are not ratings on this scale).
_RATED = re.compile(r"\b(?:rating|score)\b(?:\s+(?:is|of))?[\s*_:=\[\]()\"'`]*([0-2])(?![0-9]|\.[0-9])", re.I)
_BARE = re.compile(r"^[\s*\[\]()\"'`]*([0-2])[\s*\[\]()\"'`.]*$")


def parse_rating(answer: str) -> int | None:
    """The judge's rating (0, 1 or 2) from its answer, or None when there is none.

    The first 0-2 digit after "Rating"/"Score" (markdown, brackets and colons skipped); else an
    answer that is nothing but such a digit. Anything else (no rating, a rating off the scale) is None.
    """
    m = _RATED.search(answer or "")
    if m is None:
        m = _BARE.match(answer or "")
    return int(m.group(1)) if m else None


def harmonic_mean3(scores: tuple[int | None, ...]) -> float | None:
    """Harmonic mean of 0-2 ratings: None if any is missing, 0 if any is 0 (AxBench's aggregate)."""
    rated = [s for s in scores if s is not None]
    if len(rated) < len(scores):
        return None
    if 0 in rated:
        return 0.0
    return len(rated) / sum(1.0 / s for s in rated)


def judge_generation(backend: TextBackend, concept: str, instruction: str, continuation: str) -> dict[str, Any]:
    """Three judge calls for one generation -> ``{judge_concept, judge_instruction, judge_fluency, judge_hm}``.

    Ratings are ints 0-2 or None (unparseable answer); ``judge_hm`` a float, or None if any is None.
    """
    out: dict[str, Any] = {}
    for aspect in ASPECTS:
        answer = backend.generate(judge_messages(aspect, concept, instruction, continuation), MAX_NEW_TOKENS)
        out[f"judge_{aspect}"] = parse_rating(answer)
    out["judge_hm"] = harmonic_mean3(tuple(out[f"judge_{a}"] for a in ASPECTS))
    return out


def judge_rows(backend: TextBackend, rows: list[dict[str, Any]], concept: str) -> int:
    """Add the judge columns to sweep rows (their ``prompt`` and ``text``) in place; returns the number
    of unparseable answers."""
    unparsed = 0
    for r in rows:
        scores = judge_generation(backend, concept, r["prompt"], r["text"])
        unparsed += sum(scores[f"judge_{a}"] is None for a in ASPECTS)
        r.update(scores)
    return unparsed
