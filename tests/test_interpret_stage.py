"""The interpret stage end to end on a tiny model and an SAE with planted features."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.errors import UserError
from pipeline.interpret.synthetic import TOKEN_FEATURE, TOPIC_FEATURE, write_planted_world
from pipeline.params import ParamsError, load_params
from pipeline.testing import default_params, write_params
from stages.interpret import run_interpret


def _params(world, tiny: Path, llm: dict | None = None, **interpret):
    path = world.root / "params.yaml"
    write_params(path, default_params(model={"name": str(tiny)}, extract={"hooks": [world.hook]}, llm=llm or {},
                                      interpret={"batch_size": 500, "encode_dtype": "float32", **interpret}))
    return load_params(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_llama):
    world = write_planted_world(tmp_path_factory.mktemp("planted"), tiny_llama)
    metrics = run_interpret(_params(world, tiny_llama), world.root)
    return world, metrics


def test_planted_token_feature_found(planted):
    world, _ = planted
    out = world.root / "data" / "interpret" / world.hook
    feats = pl.read_parquet(out / "features.parquet")
    assert feats.height == world.d_sae and feats["feature"].to_list() == list(range(world.d_sae))
    row = feats.row(TOKEN_FEATURE, named=True)
    assert row["top_token_ids"][0] == world.token_id  # decoder = unembedding row: the lens finds it
    ex = pl.read_parquet(out / "examples.parquet")
    top = ex.filter((pl.col("feature") == TOKEN_FEATURE) & (pl.col("kind") == "top")).sort("rank")
    assert top.height == 20
    for r in top.iter_rows(named=True):  # every top example peaks on the planted token, and only there
        assert r["tokens"][r["max_position"]] == world.token_id
        acts, toks = np.array(r["activations"]), np.array(r["tokens"])
        assert ((acts > 0) == (toks == world.token_id)).all()
        assert len(r["tokens"]) == len(r["activations"]) == 32 and r["text"]
    assert (top["max_activation"].diff().drop_nulls() <= 0).all()
    assert row["detection_balanced_accuracy@1"] == 1.0  # the stats explanation names the token
    assert row["fuzzing_balanced_accuracy@2"] == 1.0
    assert set(ex["kind"].unique()) == {"top", "quantile", "random"}
    neg = ex.filter((pl.col("feature") == TOKEN_FEATURE) & (pl.col("kind") == "random"))
    assert neg.height > 0 and all(world.token_id not in t for t in neg["tokens"].to_list())


def test_planted_topic_feature_auroc(planted):
    world, metrics = planted
    feats = pl.read_parquet(world.root / "data" / "interpret" / world.hook / "features.parquet")
    row = feats.row(TOPIC_FEATURE, named=True)
    assert row["topic"] == world.topic and row["topic_auroc@1"] == 1.0
    others = feats.filter(pl.col("feature") != TOPIC_FEATURE)["topic_auroc@1"].drop_nans().drop_nulls()
    assert (others < 1.0).all()
    m = json.loads((world.root / "results" / "interpret.json").read_text())[world.hook]
    assert m == json.loads(json.dumps(metrics[world.hook]))
    assert m["alive_features@1"] == int((feats["fire_count"] > 0).sum())
    assert m["frac_topic_auroc_ge_0.9@1"] > 0 and 0 < m["mean_detection_balanced_accuracy@1"] <= 1


def test_dashboard_written(planted):
    world, _ = planted
    root = world.root / "reports" / "features"
    page = (root / world.hook / "index.html").read_text()
    assert "index-data" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")  # offline
    shard = (root / world.hook / "data" / "shard-0000.js").read_text()
    assert shard.startswith("window.__shard(0,") and '"examples"' in shard
    assert f'href="{world.hook}/index.html"' in (root / "index.html").read_text()


def test_rerun_is_deterministic(planted, tiny_llama, tmp_path):
    world, _ = planted
    out = world.root / "data" / "interpret" / world.hook
    before = pl.read_parquet(out / "features.parquet").drop("explanation", "explainer", "scorer")
    run_interpret(_params(world, tiny_llama, batch_size=333), world.root)  # other batching, same answers
    after = pl.read_parquet(out / "features.parquet").drop("explanation", "explainer", "scorer")
    assert before.equals(after)


def test_local_lm_explainer_is_cached(planted, tiny_llama):
    world, _ = planted
    p = _params(world, tiny_llama, explainer=f"local:{tiny_llama}", n_explain=2, max_new_tokens=4,
                n_examples=4, n_quantiles=2, examples_per_quantile=1, n_random=2)
    m = run_interpret(p, world.root)[world.hook]
    assert m["explainer"] == f"local:{tiny_llama}" and m["explained_features"] == 2
    cache = list((world.root / "data" / "interpret_cache").glob("*.jsonl"))
    assert len(cache) == 1
    n_lines = len(cache[0].read_text().splitlines())
    assert n_lines > 2
    feats = pl.read_parquet(world.root / "data" / "interpret" / world.hook / "features.parquet")
    assert feats.filter(pl.col("explainer") == f"local:{tiny_llama}").height == 2
    run_interpret(p, world.root)  # every call answered from the cache
    assert len(cache[0].read_text().splitlines()) == n_lines


def test_user_errors(planted, tiny_llama, tmp_path):
    world, _ = planted
    with pytest.raises(ParamsError, match="interpret.explainer"):
        _params(world, tiny_llama, explainer="gpt4")
    p = _params(world, tiny_llama)
    with pytest.raises(UserError, match="sae prepare"):
        run_interpret(p, tmp_path)


class _Endpoint(BaseHTTPRequestHandler):
    """OpenAI-compatible fake: answers ``budget`` requests, then fails with HTTP 503."""

    budget = 0
    served = 0

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        if cls.budget <= 0:
            self.send_response(503)
            self.end_headers()
            return
        cls.budget -= 1
        cls.served += 1
        data = json.dumps({"choices": [{"message": {"content": 'Yes fires on "x"'}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_endpoint_failure_keeps_finished_features(planted, tiny_llama):
    world, _ = planted
    srv = HTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        p = _params(world, tiny_llama, explainer="openai:fake", n_explain=3,
                    llm={"max_retries": 0, "base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1"})
        _Endpoint.budget = 45  # one feature needs at most 1 + 20 + 20 calls: the second one fails
        with pytest.raises(UserError, match="failed after 1 attempts"):
            run_interpret(p, world.root)
        cache = world.root / "data" / "interpret_cache" / "openai_fake.jsonl"
        kept = len(cache.read_text().splitlines())
        assert kept >= 21  # the finished feature's calls (and the failed one's answered calls) survived
        _Endpoint.budget, _Endpoint.served = 10_000, 0
        m = run_interpret(p, world.root)[world.hook]
        assert m["explained_features"] == 3 and _Endpoint.served <= 3 * 41 - kept  # only the rest was asked
    finally:
        srv.shutdown()
