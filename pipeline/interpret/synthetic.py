"""A synthetic "world" with planted features, for tests and the CPU benchmark of the interpret stage.

Writes, under a root directory, what the interpret stage reads: ``data/tokens/{contexts,documents}.parquet``,
``data/activations/<split>/<hook>/`` and ``models/sae/<hook>/`` (a ``relu_l1`` SAE whose weights are set
by hand). Activations are built, not extracted: ``x = 4 * E[token] (dims 0..15) + 2 * onehot(topic)
(next dims) + small noise``, with ``E`` random unit codes. Planted features:

- ``TOKEN_FEATURE`` fires exactly on token ``token_id`` (encoder = its code, bias = -0.9 * 4, so it
  needs cosine > 0.9 with that code); its decoder row is the unembedding row of that token, so the
  logit lens must rank that token first;
- ``TOPIC_FEATURE`` fires on every token of documents labelled ``topic`` (so topic AUROC = 1);
- the other features are random directions with a high bias (sparse, uninformative).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.paths import ACTIVATIONS, MODELS, TOKENS

TOKEN_FEATURE, TOPIC_FEATURE = 0, 1
CODE_DIMS = 16


@dataclass
class PlantedWorld:
    root: Path
    hook: str
    token_id: int
    topic: str
    d_sae: int


def write_planted_world(root: Path, model_dir: Path, hook: str = "layers.1.resid_post", d_sae: int = 64,
                        context_length: int = 32, n_docs: int = 90, seed: int = 0, word: str = " guitar") -> PlantedWorld:
    from pipeline.activations import ActivationWriter
    from pipeline.models import load_model
    from pipeline.sae import SAEConfig, make_sae, save_sae
    from pipeline.testing import TOPICS, labelled_documents

    lm = load_model(str(model_dir))
    tok, W_U = lm.tokenizer, lm.model.get_output_embeddings().weight.detach().float()  # [vocab, d]
    vocab, d = W_U.shape
    if d < CODE_DIMS + len(TOPICS) + 1:
        raise ValueError(f"d_model {d} too small for the planted world")
    docs = labelled_documents(n_docs, seed=seed)
    stream, doc_of = [], []
    for i, doc in enumerate(docs):
        ids = tok.encode(" " + doc["text"], add_special_tokens=False)
        stream += ids
        doc_of += [i] * len(ids)
    n_ctx = len(stream) // context_length
    T = context_length
    token_ids = np.array(stream[: n_ctx * T]).reshape(n_ctx, T)
    document_ids = np.array(doc_of[: n_ctx * T]).reshape(n_ctx, T)
    split = np.where(np.arange(n_ctx) % 10 == 9, "validation", "train")
    tdir = Path(root) / TOKENS
    tdir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "context_id": pa.array(np.arange(n_ctx), pa.int32()), "split": pa.array(split),
        "token_ids": pa.array(token_ids.tolist(), pa.list_(pa.int32())),
        "document_ids": pa.array(document_ids.tolist(), pa.list_(pa.int32()))}), tdir / "contexts.parquet")
    pq.write_table(pa.table({
        "document_id": pa.array(np.arange(n_docs), pa.int32()), "split": pa.array(["train"] * n_docs),
        "title": [doc["title"] for doc in docs], "label": [doc["topic"] for doc in docs],
        "n_tokens": pa.array(np.bincount(doc_of, minlength=n_docs), pa.int32())}), tdir / "documents.parquet")

    g = torch.Generator().manual_seed(seed)
    E = torch.randn(vocab, CODE_DIMS, generator=g)
    E = E / E.norm(dim=1, keepdim=True)
    target = tok.encode(word, add_special_tokens=False)[-1]
    topic_idx = {t: i for i, t in enumerate(TOPICS)}
    label_of_doc = torch.tensor([topic_idx[doc["topic"]] for doc in docs])
    for s in ("train", "validation"):
        rows = np.flatnonzero(split == s)
        ti, di = torch.from_numpy(token_ids[rows].ravel()), torch.from_numpy(document_ids[rows].ravel())
        x = 0.01 * torch.randn(len(ti), d, generator=g)
        x[:, :CODE_DIMS] += 4 * E[ti]
        x[torch.arange(len(ti)), CODE_DIMS + label_of_doc[di]] += 2.0
        w = ActivationWriter(Path(root) / ACTIVATIONS / s / hook, hook=hook, d_model=d, dtype="float32")
        w.write_shard(0, np.repeat(rows, T), np.tile(np.arange(T), len(rows)), ti.numpy(), x)
        w.finalize()

    sae = make_sae(SAEConfig(arch="relu_l1", d_in=d, d_sae=d_sae, hook=hook, recipe="2024"), seed=seed)
    with torch.no_grad():
        W_enc = torch.randn(d, d_sae, generator=g) / d**0.5
        b_enc = torch.full((d_sae,), -2.5)
        W_enc[:, TOKEN_FEATURE] = 0
        W_enc[:CODE_DIMS, TOKEN_FEATURE] = E[target]
        b_enc[TOKEN_FEATURE] = -0.9 * 4
        W_enc[:, TOPIC_FEATURE] = 0
        W_enc[CODE_DIMS + topic_idx[TOPICS[0]], TOPIC_FEATURE] = 1.0
        b_enc[TOPIC_FEATURE] = -1.0
        W_dec = torch.randn(d_sae, d, generator=g)
        W_dec[TOKEN_FEATURE] = W_U[target]
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.b_dec.zero_()
    save_sae(sae, Path(root) / MODELS / hook)
    return PlantedWorld(Path(root), hook, int(target), TOPICS[0], d_sae)
