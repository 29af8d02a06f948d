"""One SAE through the SAEBench-comparable evals: sparse probing, absorption, core; result files + metrics.

The stage (``stages/bench.py``) resolves paths and params and calls :func:`bench_hook` per hook; this
module turns the evals' outputs into versioned metric names (:mod:`pipeline.metric_names`) and
SAEBench result files (:mod:`pipeline.saebench.results`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metric_names as names
from pipeline.saebench import absorption as absorb
from pipeline.saebench import core, pooling, results, words

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """The ``bench`` params the library needs (the stage copies them from the params section)."""

    documents_per_label: int | None = 200
    validation_fraction: float = 0.2
    test_fraction: float = 0.2
    k_values: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    bootstrap_resamples: int = 1000
    absorption_words: int | None = 1000
    absorption_min_letters: int = 20
    absorption_batch_size: int = 32
    core_tokens: int = 32768
    n_splice_contexts: int = 8
    batch_size: int = 4096
    encode_dtype: str = "float32"


def encoder(sae: Any, dtype: str, device: torch.device):  # -> Callable[[Tensor], Tensor]
    """``x[n, d] float32 -> f[n, d_sae] float32`` on ``device``, through a bfloat16 copy of the SAE when asked."""
    model, cast = (sae, torch.float32) if dtype == "float32" else (copy.deepcopy(sae).to(torch.bfloat16), torch.bfloat16)

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.encode(x.to(device, cast)).float().cpu()

    return encode


def probe_documents(datasets: list[Any], contexts: Any, documents: Any, special: frozenset[int], encode: Any,
                    d_sae: int, cfg: BenchConfig, seed: int, batch_size: int) -> pooling.Pooled:
    """Choose, split and pool the labelled documents found in ``datasets`` (one per corpus split, each
    streamed in context order only as far as the last context holding a chosen document)."""
    doc_of = pooling.document_index(contexts["context_id"].to_numpy(), contexts["document_ids"].to_list())
    span = pooling.context_span(doc_of)
    docs = documents.filter(documents["label"].is_not_null() & documents["document_id"].is_in(list(span)))
    doc_ids, labels = docs["document_id"].to_numpy(), docs["label"].to_numpy().astype(str)
    chosen = pooling.choose_documents(doc_ids, labels, np.array([span[int(d)][0] for d in doc_ids]),
                                      cfg.documents_per_label)
    label_of = dict(zip(doc_ids.tolist(), labels.tolist(), strict=True))
    last = max(span[int(d)][1] for d in chosen)

    def stream(ds: Any) -> Any:
        for b in ds.iter_batches(batch_size, shuffle=False):
            if int(b.context_id.min()) > last:  # datasets are written in context order
                return
            yield b.acts, b.context_id, b.position, b.token_id

    llm, sae, n = pooling.pool_documents((b for ds in datasets for b in stream(ds)), doc_of, chosen, special,
                                         encode, d_sae)
    found = n > 0  # a chosen document whose tokens are all special (or absent) cannot be probed
    chosen, llm, sae, n = chosen[found], llm[found], sae[found], n[found]
    labs = np.array([label_of[int(d)] for d in chosen])
    split = pooling.split_documents(labs, cfg.validation_fraction, cfg.test_fraction, seed)
    return pooling.Pooled(chosen, labs, split, llm, sae, n)


def probing_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """Versioned headline numbers, their intervals and per-label values for ``metrics/bench.json``."""
    out: dict[str, Any] = {}
    for name, v in res["mean"].items():
        vn = names.versioned(name)
        out[vn] = v
        out[f"{vn}_ci_low"], out[f"{vn}_ci_high"] = res["ci"][name]
    out["per_label"] = {lab: {names.versioned(n): v for n, v in vals.items()} for lab, vals in res["per_label"].items()}
    out["n_test_documents"] = int(sum(res["n_test"].values()))
    return out


def absorption_eval(model: Any, tokenizer: Any, hook: str, encode: Any, W_dec: np.ndarray, cfg: BenchConfig,
                    seed: int, device: torch.device) -> dict[str, Any]:
    """Words, prompts, the model's activations at the word token, then :func:`absorption.absorption`."""
    vocab = words.alpha_words(tokenizer)
    train_w, test_w = words.split_words(vocab, cfg.absorption_words, seed)
    add_bos = tokenizer.bos_token_id is not None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    acts, letters = [], []
    for i, (ws, pool) in enumerate(((train_w, train_w), (test_w, test_w))):
        prompts = words.make_prompts(ws, pool, seed + i)
        ids, pos = words.word_positions(tokenizer, prompts, add_bos)
        acts.append(words.word_activations(model, hook, ids, pos, cfg.absorption_batch_size, pad, device))
        letters.append(np.array([p.letter for p in prompts]))
    res = absorb.absorption(acts[0], letters[0], acts[1], letters[1], lambda x: encode(torch.from_numpy(x)).numpy(),
                            W_dec, seed, cfg.absorption_min_letters)
    res["n_words"] = {"vocabulary": len(vocab), "train": len(train_w), "test": len(test_w)}
    return res


def absorption_metrics(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {names.ABSORPTION_LETTERS: res["n_present"]}
    if res["mean"] is not None:
        out[names.MEAN_ABSORPTION_FRACTION] = res["mean"]["mean_absorption_fraction_score"]
        out[names.MEAN_FULL_ABSORPTION] = res["mean"]["mean_full_absorption_score"]
        out[names.MEAN_SPLIT_FEATURES] = res["mean"]["mean_num_split_features"]
    else:
        out["absorption_note"] = res["note"]
    return out


def feature_metrics(sae: Any, density: np.ndarray | None = None) -> list[dict[str, Any]]:
    """SAEBench core's per-latent weight metrics (``consistent_activation_heuristic`` not computed: 0.0)."""
    W_dec = sae.W_dec.detach().float().cpu()  # [d_sae, d]
    W_enc = getattr(sae, "W_enc", None)
    W_enc = W_enc.detach().float().cpu().T if W_enc is not None else W_dec  # [d_sae, d]
    b_enc = getattr(sae, "b_enc", None)
    b = b_enc.detach().float().cpu() if b_enc is not None else torch.zeros(len(W_dec))
    enc_dec = torch.nn.functional.cosine_similarity(W_enc, W_dec, dim=-1)
    max_dec, max_enc = core.max_cosine(W_dec), core.max_cosine(W_enc)
    dens = density if density is not None else np.zeros(len(W_dec))
    return [{"index": i, "feature_density": float(dens[i]), "consistent_activation_heuristic": 0.0,
             "encoder_bias": round(float(b[i]), 4), "encoder_norm": round(float(W_enc[i].norm()), 4),
             "encoder_decoder_cosine_sim": round(float(enc_dec[i]), 4),
             "max_decoder_cosine_sim": round(float(max_dec[i]), 4), "max_encoder_cosine_sim": round(float(max_enc[i]), 4)}
            for i in range(len(W_dec))]


def autointerp_from_features(path: Path) -> tuple[float, float, int, str, str] | None:
    """(mean, std, n, explainer, scorer) of ``detection_balanced_accuracy@1`` over scored features, or None."""
    import polars as pl

    if not path.is_file():
        return None
    df = pl.read_parquet(path)
    col = "detection_balanced_accuracy@1"
    if col not in df.columns:
        return None
    v = df[col].drop_nulls().drop_nans().to_numpy()
    if len(v) < 2:
        return None
    first = lambda c: str(df[c].drop_nulls()[0]) if c in df.columns and df[c].drop_nulls().len() else "?"  # noqa: E731
    return float(v.mean()), float(v.std(ddof=1)), len(v), first("explainer"), first("scorer")


def timed(fn: Any, label: str, seconds: dict[str, float]) -> Any:
    """Run ``fn``, logging its wall and CPU seconds (CPU time, summed over threads, is what a shared box
    cannot inflate). Wall-clock figures stay out of the results (they are not reproducible)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds[label] = round(time.perf_counter() - t0, 2)
    log.info("bench: %s in %.1fs (%.1f CPU s)", label, seconds[label], time.process_time() - c0)
    return out


__all__ = ["BenchConfig", "encoder", "probe_documents", "probing_metrics", "absorption_eval", "absorption_metrics",
           "feature_metrics", "autointerp_from_features", "timed", "results"]
