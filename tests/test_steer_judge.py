"""The optional LLM judge of steering (``steer.judge``): rubric parsing, harmonic mean, cache, params, stage."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from fake_endpoint import FakeEndpoint, serve
from stage_workspace import invoke, sets
from test_steer_stage import FAST, prepared, workspace  # noqa: F401  (module fixtures)

from pipeline.autointerp.backends import Cached
from pipeline.params import ParamsError, load_params
from pipeline.steering.judge import (
    PROMPT_VERSION,
    harmonic_mean3,
    judge_generation,
    judge_messages,
    judge_rows,
    parse_rating,
)
from pipeline.steering.summary import choose_and_report
from pipeline.testing import default_params, write_params
from stages.cli import main


class FakeJudge:
    """Canned answers per rubric (told apart by their first words); counts calls."""

    name = "fake:judge"

    def __init__(self, concept: str, instruction: str, fluency: str) -> None:
        self.answers = {"concept": concept, "instruction": instruction, "fluency": fluency}
        self.calls = 0

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        self.calls += 1
        user = messages[-1]["content"]
        aspect = "concept" if "concept below" in user else "instruction" if "instruction below" in user else "fluency"
        return self.answers[aspect]

    def yes_prob(self, messages: list[dict[str, str]]) -> float:  # the Backend protocol; unused by the judge
        raise AssertionError("the judge only generates")

    def yes_probs(self, batch: list[list[dict[str, str]]]) -> list[float]:
        raise AssertionError("the judge only generates")


@pytest.mark.parametrize(("answer", "rating"), [
    ("Rating: 2", 2),
    ("**Rating**: [1]", 1),
    ("The concept is absent. Rating: [[0]]", 0),
    ('Use "Rating: [[N]]". It reads well. rating:[[2]]', 2),  # the echoed format has no digit: skipped
    ("I would give it a rating of 1.", 1),
    ("[[2]]", 2),
    ("Rating: 10", None),  # off the 0-2 scale
    ("Rating: 1.5", None),
    ("The text is about cooking, 2 ideas.", None),  # a digit, but no rating
    ("", None),
    ("garbage ~~ ##", None),
])
def test_parse_rating(answer: str, rating: int | None) -> None:
    assert parse_rating(answer) == rating


def test_harmonic_mean_hand_computed() -> None:
    assert harmonic_mean3((2, 1, 2)) == pytest.approx(3 / (1 / 2 + 1 / 1 + 1 / 2))  # = 1.5
    assert harmonic_mean3((2, 2, 2)) == 2.0 and harmonic_mean3((1, 1, 1)) == 1.0
    assert harmonic_mean3((2, 0, 2)) == 0.0  # any zero -> 0 (AxBench)
    assert harmonic_mean3((2, None, 0)) is None  # a missing rating is never guessed


def test_judge_generation_scores_and_unparsed_count() -> None:
    judge = FakeJudge("The concept is clear. Rating: [[2]]", "**Rating**: [1]", "Rating: 2")
    out = judge_generation(judge, "music", "The music was", " loud and the band played")
    assert out == {"judge_concept": 2, "judge_instruction": 1, "judge_fluency": 2, "judge_hm": pytest.approx(1.5)}
    assert judge.calls == 3
    zero = judge_generation(FakeJudge("Rating: 0", "Rating: 2", "Rating: 2"), "music", "The music was", " x")
    assert zero["judge_hm"] == 0.0
    rows = [{"prompt": "The music was", "text": " loud"}, {"prompt": "It is", "text": " raining"}]
    assert judge_rows(FakeJudge("Rating: 2", "no idea", "Rating: 1"), rows, "music") == 2  # 2 rows x 1 bad answer
    assert all(r["judge_instruction"] is None and r["judge_hm"] is None and r["judge_concept"] == 2 for r in rows)


def test_prompts_name_concept_instruction_and_text() -> None:
    msgs = {a: judge_messages(a, "space", "We saw the planet", " orbit the moon") for a in ("concept", "instruction", "fluency")}
    assert "Concept: space" in msgs["concept"][-1]["content"]
    assert "Instruction: We saw the planet" in msgs["instruction"][-1]["content"]
    assert all("Text fragment: orbit the moon" in m[-1]["content"] and "0, 1 or 2" in m[-1]["content"] for m in msgs.values())
    # Fluency is judged on the text alone, blind to the concept and the instruction.
    assert "space" not in msgs["fluency"][-1]["content"] and "planet" not in msgs["fluency"][-1]["content"]


def test_judge_calls_are_cached_per_prompt_version(tmp_path: Path) -> None:
    fake = FakeJudge("Rating: 2", "Rating: 1", "Rating: 2")
    cache = Cached(fake, tmp_path / "judge.jsonl", PROMPT_VERSION)
    first = judge_generation(cache, "music", "The music was", " loud")
    assert judge_generation(cache, "music", "The music was", " loud") == first
    assert fake.calls == 3  # the second call never reached the backend
    cache.flush()
    again = Cached(fake, tmp_path / "judge.jsonl", PROMPT_VERSION)
    assert judge_generation(again, "music", "The music was", " loud") == first and fake.calls == 3
    # A new prompt version must not reuse old answers.
    judge_generation(Cached(fake, tmp_path / "judge.jsonl", PROMPT_VERSION + "x"), "music", "The music was", " loud")
    assert fake.calls == 6


@pytest.mark.parametrize("value", ["stats", "gpt-4", "'local:'", "'openai:'", "remote:m"])
def test_bad_judge_param_is_one_line_naming_the_key(tmp_path: Path, value: str) -> None:
    p = tmp_path / "params.yaml"
    write_params(p, default_params())
    with pytest.raises(ParamsError) as err:
        load_params(p, [f"steer.judge={value}"])
    assert "steer.judge:" in str(err.value) and "not allowed" in str(err.value) and "\n" not in str(err.value)
    for ok in ("none", "local:smollm2-135m", "openai:gpt-4o-mini"):
        assert load_params(p, [f"steer.judge={ok}"]).steer.judge == ok


def test_report_without_judge_columns_is_unchanged() -> None:
    rows = [{"feature": 1, "topic": "t", "method": m, "coefficient": c, "prompt_id": i, "split": s, "hm@2": h,
             "concept@2": h, "fluency@2": 1.0}
            for i, s in ((0, "validation"), (1, "test"), (2, "test")) for m, c, h in (("none", 0.0, 0.1), ("add", 1.0, 0.5), ("dim", 1.0, 0.3))]
    plain = choose_and_report(pl.DataFrame(rows))
    assert not any("judge" in k for k in plain["overall"]) and "judge_hm" not in plain["methods"]["add"]
    judged = [{**r, "judge_concept": 2, "judge_instruction": 1, "judge_fluency": 2,
               "judge_hm": {"none": 0.0, "add": 1.5, "dim": 1.0}[r["method"]]} for r in rows]
    rep = choose_and_report(pl.DataFrame(judged))
    assert rep["methods"]["add"]["judge_hm"] == 1.5 and rep["methods"]["dim"]["judge_hm"] == 1.0
    d = rep["overall"]["judge_sae_minus_dim_hm@3"]  # constant paired difference 0.5: a zero-width interval
    assert d["mean"] == pytest.approx(0.5) and d["ci95_low"] == pytest.approx(0.5) and d["verdict"] == "beats"
    assert rep["overall"]["summary"].startswith(plain["overall"]["summary"] + ". LLM judge:")


def _judge_answer(body: dict) -> dict:
    """Answers like :class:`FakeJudge`."""
    user = body["messages"][-1]["content"]
    answer = ("Rating: [[2]]" if "concept below" in user else "**Rating**: [1]" if "instruction below" in user
              else "Fluent. Rating: 2")
    return {"choices": [{"message": {"content": answer}}]}


@pytest.fixture()
def endpoint():
    with serve(_judge_answer) as fake:
        yield fake


def test_steer_stage_with_and_without_judge(workspace: Path, endpoint: FakeEndpoint) -> None:  # noqa: F811
    small = FAST + ["steer.methods=[add, dim]", "steer.coefficients=[2.0]"]
    invoke("steer", *sets(small))
    plain_gen = Path("data/steer/generations.parquet").read_bytes()
    plain_metrics = Path("results/steer.json").read_text()
    plain = pl.read_parquet("data/steer/generations.parquet")
    assert "judge" not in plain_metrics and not any(c.startswith("judge") for c in plain.columns)

    judged = [*small, "steer.judge=openai:fake-judge", f"llm.base_url={endpoint.url}"]
    invoke("steer", *sets(judged))
    gen = pl.read_parquet("data/steer/generations.parquet")
    assert gen.height == 2 * 4 * (1 + 2)  # every row judged, the unsteered reference included
    assert (gen["judge_concept"] == 2).all() and (gen["judge_instruction"] == 1).all() and (gen["judge_fluency"] == 2).all()
    assert gen["judge_hm"].to_list() == pytest.approx([1.5] * gen.height)
    sent = [c["body"]["messages"][-1]["content"] for c in endpoint.calls]  # the user prompts the judge got
    assert len(sent) == len(set(sent)) <= 3 * gen.height  # duplicate texts hit the cache
    m = json.loads(Path("results/steer.json").read_text())
    assert m["judge"]["backend"] == "openai:fake-judge" and m["judge"]["unparsed"] == 0
    assert m["judge"]["prompt_version"] == PROMPT_VERSION
    for f, concept in m["judge"]["concepts"].items():
        assert m["features"][f]["topic"] == concept  # labelled corpus: the topic, shared by all methods
        assert any(f"Concept: {concept}" in c for c in sent)
    assert m["methods"]["add"]["judge_hm"] == pytest.approx(1.5) and m["methods"]["dim"]["judge_hm"] == pytest.approx(1.5)
    d = m["overall"]["judge_sae_minus_dim_hm@3"]  # a tie: difference 0, interval [0, 0]
    assert "LLM judge" in m["overall"]["summary"] and d["verdict"] == "is indistinguishable from"
    assert d["mean"] == d["ci95_low"] == d["ci95_high"] == 0.0 and d["wins"] == "0/2"
    # The automatic metrics are untouched by the judge: its columns are added, nothing else changes.
    assert gen.drop("judge_concept", "judge_instruction", "judge_fluency", "judge_hm").equals(plain)
    assert Path("data/steer_cache/openai_fake-judge.jsonl").is_file()

    n = len(endpoint.calls)  # a rerun answers from the cache: nothing sent
    invoke("steer", *sets(judged))
    assert len(endpoint.calls) == n
    assert pl.read_parquet("data/steer/generations.parquet").equals(gen)

    # Judge off again: outputs byte for byte as before it ran.
    invoke("steer", *sets(small))
    assert Path("data/steer/generations.parquet").read_bytes() == plain_gen
    assert Path("results/steer.json").read_text() == plain_metrics
    res = CliRunner().invoke(main, ["steer", *sets(small + ["steer.judge=gpt4"])])
    assert res.exit_code == 2 and "steer.judge" in res.output


def test_steer_stage_local_judge_that_never_rates(workspace: Path, tiny_llama: Path,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A local judge (the tiny random model: it never answers with a rating) runs through the shared
    backend code; every answer is counted unparsed and recorded as null, and nothing crashes."""
    monkeypatch.setattr("pipeline.steering.judge.MAX_NEW_TOKENS", 4)  # seconds, not a minute
    invoke("steer", *sets(FAST + ["steer.methods=[add]", "steer.coefficients=[2.0]", "steer.n_features=1",
                                    f"steer.judge=local:{tiny_llama}"]))
    gen = pl.read_parquet("data/steer/generations.parquet")
    assert gen["judge_hm"].dtype == pl.Float64 and gen["judge_concept"].dtype == pl.Int64
    assert gen["judge_hm"].is_null().all()
    m = json.loads(Path("results/steer.json").read_text())
    assert m["judge"]["unparsed"] == m["judge"]["ratings"] == 3 * gen.height
    assert m["methods"]["add"]["judge_hm"] is None and "judge_sae_method" not in m["overall"]
