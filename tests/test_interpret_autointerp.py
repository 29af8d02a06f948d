"""Explainers, the lexical simulator, the detection/fuzzing metrics, and the LM backends (local + HTTP)."""

from __future__ import annotations

import numpy as np
import pytest
from fake_endpoint import serve

from pipeline.autointerp import Evidence, LexicalSimulator, binary_metrics, simulate_scores, stats_explanation
from pipeline.autointerp.backends import Cached, LocalChat, OpenAIChat
from pipeline.autointerp.explain import split_evidence
from pipeline.autointerp.run import lm_explain_and_score
from pipeline.autointerp.simulate import explanation_terms
from pipeline.errors import UserError

VOCAB = {0: " the", 1: " cat", 2: " sat", 3: " on", 4: " mat", 5: " dog", 6: " big", 7: "."}
NORM = {i: s.strip().lower() for i, s in VOCAB.items()}


def planted(seed: int = 0, n: int = 12, T: int = 10):
    """Contexts over VOCAB; the feature fires on ' cat' (token 1) only."""
    rng = np.random.default_rng(seed)
    tokens = rng.choice([0, 2, 3, 4, 5, 6, 7], size=(n, T))
    pos = tokens.copy()
    pos[:, 4] = 1
    acts = np.where(pos == 1, 2.0, 0.0).astype(np.float32)
    return pos, acts, tokens


def test_binary_metrics_hand_computed():
    m = binary_metrics(np.array([0.9, 0.2, 0.6, 0.1]), np.array([True, True, False, False]), 0.5, "x")
    # TPR 1/2, TNR 1/2 -> BA 0.5; F1 = 2*1/(2*1+1+1) = 0.5; AUC: pos {.9,.2} vs neg {.6,.1}: 3 of 4 pairs
    assert m["x_balanced_accuracy@1"] == 0.5 and m["x_f1@1"] == 0.5 and m["x_auc@1"] == 0.75


def test_explanation_terms():
    assert explanation_terms('fires on "cat", "the mat"; topic: pets') == ([["cat"], ["the", "mat"]], False)
    terms, fuzzy = explanation_terms("Mentions of animals like dogs")
    assert fuzzy and ["animals"] in terms and ["dogs"] in terms and ["like"] not in terms


def test_detection_perfect_high_wrong_chance():
    pos, acts, neg = planted()
    sim = LexicalSimulator(NORM)
    good = simulate_scores(sim, 'fires on "cat"', pos, neg, acts, seed=0)
    bad = simulate_scores(sim, 'fires on "zebra"', pos, neg, acts, seed=0)
    assert good["detection_balanced_accuracy@1"] == 1.0 and good["detection_auc@1"] == 1.0
    assert good["fuzzing_balanced_accuracy@2"] == 1.0
    assert bad["detection_balanced_accuracy@1"] == 0.5 and bad["detection_auc@1"] == 0.5
    assert bad["fuzzing_balanced_accuracy@2"] == 0.5
    # A bigram term only matches where both tokens appear in order.
    assert sim.predict('"big cat"', np.array([[6, 1, 1, 0]])).tolist() == [[False, True, False, False]]


def test_stats_explainer_finds_token_and_ngram():
    pos, acts, neg = planted()
    ev = Evidence(3, pos, acts, pos, acts, neg, topic="pets", topic_auroc=0.95)
    expl = stats_explanation(ev, NORM)
    assert '"cat"' in expl and "topic: pets" in expl
    pos2 = pos.copy()
    pos2[:, 3] = 6  # always preceded by ' big': an n-gram feature
    assert '"big cat"' in stats_explanation(Evidence(3, pos2, acts, pos2, acts, neg), NORM)


def test_split_evidence_holds_out_explainer_examples():
    kind = np.array([0, 0, 0, 0, 1, 1, 2])
    rank = np.array([0, 1, 2, 3, 0, 1, 0])
    ctx = np.array([10, 11, 12, 13, 10, 14, 20])  # quantile ctx 10 was shown to the explainer
    acts = np.ones((7, 4), np.float32)
    acts[6] = 0
    ev = split_evidence(0, kind, rank, ctx, ctx[:, None].repeat(4, 1), acts, None, float("nan"), [])
    assert sorted(ev.explain_tokens[:, 0].tolist()) == [10, 12]
    assert sorted(ev.pos_tokens[:, 0].tolist()) == [11, 13, 14]
    assert ev.neg_tokens[:, 0].tolist() == [20]


def _answer(body: dict) -> dict:
    if body.get("logprobs"):
        msg = {"content": "Yes"}
        lp = {"content": [{"token": "Yes", "logprob": 0.0,
                           "top_logprobs": [{"token": "Yes", "logprob": np.log(0.75)}, {"token": " no", "logprob": np.log(0.25)}]}]}
        return {"choices": [{"message": msg, "logprobs": lp}]}
    return {"choices": [{"message": {"content": ' fires on "cat"\n'}}]}


@pytest.fixture()
def server():
    with serve(_answer) as endpoint:
        yield endpoint


def test_openai_backend_retries_then_answers(server):
    server.fail_first = 2
    api = OpenAIChat("m", server.url, "secret", max_retries=3, timeout=5, backoff=0.01)
    assert api.generate([{"role": "user", "content": "hi"}], 10) == 'fires on "cat"'
    assert len(server.calls) == 3 and server.calls[-1]["auth"] == "Bearer secret"
    assert api.yes_prob([{"role": "user", "content": "?"}]) == pytest.approx(0.75)


def test_openai_backend_gives_up_with_user_error(server, tmp_path):
    server.fail_first = 100
    cache = Cached(OpenAIChat("m", server.url, None, max_retries=1, timeout=5, backoff=0.01), tmp_path / "c.jsonl", "v1")
    with pytest.raises(UserError, match="failed after 2 attempts"):
        cache.generate([{"role": "user", "content": "x"}], 5)
    server.fail_first, server.status = 1, 401
    with pytest.raises(UserError, match="check llm.api_key_env"):
        OpenAIChat("m", server.url, "bad", max_retries=3, backoff=0.01).generate([{"role": "user", "content": "x"}], 5)


def test_lm_scoring_is_cached(server, tmp_path):
    pos, acts, neg = planted()
    ev = Evidence(1, pos[:4], acts[:4], pos[4:], acts[4:], neg[:6])
    cache = Cached(OpenAIChat("m", server.url, None, backoff=0.01), tmp_path / "c.jsonl", "v1")
    r = lm_explain_and_score(ev, cache, VOCAB, 16, seed=0)
    assert r["explanation"] == 'fires on "cat"' and r["explainer"] == "openai:m"
    assert r["detection_balanced_accuracy@1"] == 0.5  # this fake endpoint says Yes to everything
    cache.flush()
    n = len(server.calls)
    again = Cached(OpenAIChat("m", server.url, None, backoff=0.01), tmp_path / "c.jsonl", "v1")
    assert lm_explain_and_score(ev, again, VOCAB, 16, seed=0) == r
    assert len(server.calls) == n and again.misses == 0  # rerun: nothing sent


def test_local_backend_tiny_model(tiny_llama, tmp_path):
    chat = Cached(LocalChat(str(tiny_llama)), tmp_path / "local.jsonl", "v1")
    text = chat.generate([{"role": "user", "content": "Describe: the cat sat"}], 5)
    p = chat.yes_prob([{"role": "user", "content": "Is it? Answer Yes or No."}])
    assert isinstance(text, str) and 0.0 < p < 1.0
    chat.flush()
    assert len((tmp_path / "local.jsonl").read_text().splitlines()) == 2


class RecordingBackend:
    """A fake cached backend that records every scoring prompt and answers 0.5."""

    name = "fake:m"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        return 'fires on "cat"'

    def yes_probs(self, batch: list[list[dict[str, str]]]) -> list[float]:
        self.prompts += [m[-1]["content"] for m in batch]
        return [0.5] * len(batch)


def long_contexts(seed: int, n: int = 16, T: int = 128):
    """128-token contexts where ' cat' (the feature) fires at 1-3 random positions, some near either end."""
    rng = np.random.default_rng(seed)
    tokens = rng.choice([0, 2, 3, 4, 5, 6, 7], size=(n, T))
    for i in range(n):
        tokens[i, rng.choice(T, size=1 + i % 3, replace=False)] = 1
    acts = np.where(tokens == 1, rng.uniform(1.0, 3.0, size=(n, T)), 0.0).astype(np.float32)
    return tokens, acts


def test_every_fuzzing_prompt_shows_a_highlight():
    # Before: wrong highlights were drawn anywhere in the 128 tokens but only ~33 are rendered, so
    # most "wrong" prompts had no highlight at all and an LM could answer No from that alone.
    from pipeline.autointerp.explain import MARK_L

    for feature in range(3):
        tokens, acts = long_contexts(feature)
        ev = Evidence(feature, tokens[:4], acts[:4], tokens[4:], acts[4:], np.zeros((2, 128), np.int64))
        fake = RecordingBackend()
        lm_explain_and_score(ev, fake, VOCAB, 16, seed=7)  # type: ignore[arg-type]
        fuzz = [p for p in fake.prompts if "Are the marked tokens" in p]
        assert len(fuzz) == 2 * min(10, len(ev.pos_tokens))  # a correct and a wrong prompt per scored context
        assert all(MARK_L in p.split("Text: ", 1)[1] for p in fuzz), [p for p in fuzz if MARK_L not in p.split("Text: ")[1]]


def test_fuzz_highlights_wrong_ones_are_silent_tokens_inside_the_shown_window():
    from pipeline.autointerp.explain import window
    from pipeline.autointerp.simulate import fuzz_highlights

    tokens, acts = long_contexts(3, n=40)
    correct, wrong, shown = fuzz_highlights(acts, tokens, seed=5)
    for i in range(len(tokens)):
        sl = window(tokens[i], acts[i], int(acts[i].argmax()))  # exactly what the LM prompt renders
        assert np.flatnonzero(shown[i]).tolist() == list(range(sl.start, sl.stop))
    assert not (correct & ~shown).any() and not (wrong & ~shown).any()
    assert (acts[wrong] == 0).all() and (acts[correct] > 0).all() and not (correct & wrong).any()
    assert (correct.sum(1) == wrong.sum(1)).all() and (wrong.sum(1) >= 1).all()
    again = fuzz_highlights(acts, tokens, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((correct, wrong, shown), again, strict=True))

    # Hand-made: fires at 2 (outside the window [6, 39) around the argmax 30), 30 and 31.
    t = np.zeros((1, 40), np.int64)
    a = np.zeros((1, 40), np.float32)
    a[0, [2, 30, 31]] = [0.5, 5.0, 1.0]
    c, w, s = fuzz_highlights(a, t, seed=0)
    assert np.flatnonzero(c[0]).tolist() == [30, 31] and w.sum() == 2 and s[0, 6:39].all() and s.sum() == 33
    # Fewer silent tokens than active ones in the window: both sides mark that many (here 1).
    t5, a5 = np.zeros((1, 5), np.int64), np.array([[1.0, 2.0, 3.0, 0.0, 4.0]], np.float32)
    c5, w5, _ = fuzz_highlights(a5, t5, seed=0, max_marked=8)
    assert np.flatnonzero(c5[0]).tolist() == [4] and np.flatnonzero(w5[0]).tolist() == [3]
