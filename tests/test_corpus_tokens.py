"""Corpus sources and token contexts: BOS policy, split by document, metadata kept, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.corpus import Document, iter_documents, parse_hf_source
from pipeline.errors import UserError
from pipeline.tokens import ContextSpec, build_contexts, token_labels


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    return AutoTokenizer.from_pretrained(tiny_llama)


def _docs(n: int = 40) -> list[Document]:
    return [Document(text=f"Document number {i} talks about topic {i % 3} " * 4, title=f"t{i}", label=f"L{i % 3}")
            for i in range(n)]


def test_contexts_have_fixed_length_bos_and_disjoint_splits(tokenizer) -> None:
    spec = ContextSpec(context_length=16, n_tokens=16 * 30, validation_fraction=0.25, bos="context", seed=0)
    ctx, docs = build_contexts(_docs(), tokenizer, spec)
    df, dd = pl.from_arrow(ctx), pl.from_arrow(docs)
    assert df.height == 30
    assert all(len(t) == 16 and t[0] == tokenizer.bos_token_id for t in df["token_ids"].to_list())
    # No BOS inside a context under the 'context' policy.
    assert all(tokenizer.bos_token_id not in t[1:] for t in df["token_ids"].to_list())
    val = df.filter(pl.col("split") == "validation")
    assert val.height == round(30 * 0.25)
    # Split by document: a document's tokens appear in one split only.
    doc_split = dict(zip(dd["document_id"].to_list(), dd["split"].to_list(), strict=False))
    for split, ids in zip(df["split"].to_list(), df["document_ids"].to_list(), strict=False):
        assert {doc_split[d] for d in ids} == {split}


def test_document_bos_policy_and_none(tokenizer) -> None:
    spec = ContextSpec(context_length=16, n_tokens=16 * 10, validation_fraction=0.0, bos="document", seed=0)
    ctx, _ = build_contexts(_docs(), tokenizer, spec)
    flat = np.concatenate(pl.from_arrow(ctx)["token_ids"].to_list())
    assert (flat == tokenizer.bos_token_id).sum() >= 1
    spec = ContextSpec(context_length=16, n_tokens=16 * 10, validation_fraction=0.0, bos="none", seed=0)
    ctx, _ = build_contexts(_docs(), tokenizer, spec)
    assert tokenizer.bos_token_id not in np.concatenate(pl.from_arrow(ctx)["token_ids"].to_list())


def test_same_seed_same_bytes_other_seed_other_order(tokenizer) -> None:
    spec = ContextSpec(16, 16 * 20, 0.2, "context", seed=3)
    a, _ = build_contexts(_docs(), tokenizer, spec)
    b, _ = build_contexts(_docs(), tokenizer, spec)
    c, _ = build_contexts(_docs(), tokenizer, ContextSpec(16, 16 * 20, 0.2, "context", seed=4))
    assert a.equals(b)
    assert not a.equals(c)


def test_labels_travel_with_every_token(tokenizer) -> None:
    ctx, docs = build_contexts(_docs(), tokenizer, ContextSpec(16, 16 * 12, 0.0, "context", 0))
    labels = token_labels(pl.from_arrow(ctx), pl.from_arrow(docs))
    assert labels.height == 12 * 16
    assert labels["label"].null_count() == 0
    assert set(labels["label"].unique().to_list()) <= {"L0", "L1", "L2"}


def test_budget_too_small_and_empty_corpus(tokenizer) -> None:
    with pytest.raises(UserError, match="corpus.n_tokens"):
        build_contexts(_docs(), tokenizer, ContextSpec(16, 8, 0.1, "context", 0))
    with pytest.raises(UserError, match="no documents"):
        build_contexts([], tokenizer, ContextSpec(16, 64, 0.1, "context", 0))


def test_local_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "json doc", "title": "T", "topic": "x"}) + "\n")
    pq.write_table(pa.table({"body": ["pq doc"], "topic": ["y"]}), tmp_path / "c.parquet")
    docs = list(iter_documents(f"{tmp_path}/a.txt", text_column="body"))
    assert docs == [Document("plain text document", "a", None)]
    docs = list(iter_documents(f"{tmp_path}/*.jsonl,{tmp_path}/c.parquet", text_column="body"))
    assert [(d.text, d.label) for d in docs] == [("json doc", "x"), ("pq doc", "y")]
    with pytest.raises(UserError, match="no field 'text'"):
        list(iter_documents(str(tmp_path / "b.jsonl")))
    with pytest.raises(UserError, match="matches no file"):
        list(iter_documents(str(tmp_path / "missing-*.jsonl")))


def test_hf_source_parsing_and_offline_error() -> None:
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1@test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hf_source("hf:user/data") == ("user/data", None, "train")
    with pytest.raises(UserError, match="cannot load Hugging Face dataset"):
        list(iter_documents("hf:surely-not/a-dataset-that-exists-here"))
