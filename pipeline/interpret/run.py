"""The interpret stage for one hook: statistics pass -> lens/topics -> examples -> explanations -> outputs."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.autointerp import (
    LexicalSimulator,
    lm_explain_and_score,
    split_evidence,
    stats_explain_and_score,
)
from pipeline.autointerp.backends import Cached
from pipeline.autointerp.simulate import normalise
from pipeline.environment import cpu_has_fast_bf16
from pipeline.interpret.bins import best_topic, topic_auroc
from pipeline.interpret.contexts import ContextTable
from pipeline.interpret.dashboard import DashboardShards
from pipeline.interpret.examples import CodeIndex, select_examples
from pipeline.interpret.lens import cooccurrence_neighbours, decoder_neighbours, logit_lens
from pipeline.interpret.outputs import (
    SCORES,
    dashboard_payload,
    feature_columns,
    top_example_tokens,
    write_dashboard_index,
)
from pipeline.interpret.stream import FeatureStream, stream_stats
from pipeline.interpret.tables import ExamplesWriter, features_table, summary_metrics
from pipeline.io import atomic_write_parquet
from pipeline.params.analysis import InterpretParams
from pipeline.progress import Progress

log = logging.getLogger(__name__)
FEATURE_BLOCK = 512


def token_strings(tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    """Token id -> its decoded string (each id alone)."""
    uniq = [int(i) for i in np.unique(ids) if i >= 0]
    return dict(zip(uniq, tokenizer.batch_decode([[i] for i in uniq]), strict=True))


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> 'bfloat16' on CUDA and on CPUs with native bf16 matmul (AVX512-BF16 / AMX), else 'float32'
    (elsewhere bf16 matmul is emulated and slower than float32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") or cpu_has_fast_bf16() else "float32"


def _encoder(sae: Any, dtype: str, device: str) -> Any:
    """``x[N, d_in] -> f[N, d_sae]``; with a bfloat16 copy of the SAE when asked (SAEs cast their input
    to their parameter dtype)."""
    if dtype == "float32":
        return lambda x: sae.encode(x.to(device))
    low = copy.deepcopy(sae).to(torch.bfloat16)
    return lambda x: low.encode(x.to(device, torch.bfloat16))


def interpret_hook(dataset: Any, sae: Any, table: ContextTable, tokenizer: Any, norm: torch.nn.Module,
                   W_U: torch.Tensor, cfg: InterpretParams, out_dir: Path, dash_dir: Path,
                   backend: Cached | None = None, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Write ``out_dir/{features,examples}.parquet`` and the dashboard in ``dash_dir``; return metrics.

    ``cfg``: the ``interpret`` params section (its knobs under their params names; ``split``, ``device`` and
    ``explainer`` are the stage's business: here ``device`` and ``backend`` decide); ``seed``: the run's.
    """
    t0 = time.perf_counter()
    d = int(sae.W_dec.shape[0])
    dtype = resolve_dtype(cfg.encode_dtype, device)
    stream = FeatureStream(d, len(table.label_names), cfg.n_examples, cfg.reservoir, seed, cfg.cooc_per_token,
                           cooc=d <= cfg.cooc_max_features, threshold=cfg.threshold)
    sae = sae.to(device).eval()
    with Progress(f"interpret {dataset.hook} statistics", dataset.n_tokens, unit="tok") as progress:
        batches = (_counted(progress, b.acts, b.context_id, b.position)
                   for b in dataset.iter_batches(cfg.batch_size, shuffle=False))
        stats = stream_stats(batches, _encoder(sae, dtype, device), table, stream)
    t_stream = time.perf_counter() - t0
    log.info("interpret %s: statistics pass over %d tokens in %.1fs", dataset.hook, stats.n_tokens, t_stream)

    lens_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    top_ids, top_logits, bot_ids, bot_logits = logit_lens(sae.W_dec, norm, W_U, cfg.n_logits, dtype=lens_dtype)
    nb_ids, nb_cos = decoder_neighbours(sae.W_dec, cfg.n_neighbours)
    if stats.cooc is not None:
        co_ids, co_j = cooccurrence_neighbours(stats.cooc, stats.fire_count, cfg.n_neighbours)
    else:
        log.warning("interpret: d_sae %d > interpret.cooc_max_features: co-occurrence skipped", d)
        co_ids, co_j = np.full((d, 1), -1), np.zeros((d, 1), np.float32)
    auroc = topic_auroc(stats.topic_hist, stats.n_segments)  # [d, L]
    auroc[stats.fire_count == 0] = np.nan  # a dead feature has no topic (its 0.5s would be noise)
    best_idx, best_au = best_topic(auroc)
    labels = table.label_names
    text = token_strings(tokenizer, np.concatenate([table.tokens.ravel(), top_ids.ravel(), bot_ids.ravel()]))
    norm_text = {i: normalise(s) for i, s in text.items()}
    sim = LexicalSimulator(norm_text)

    sel = select_examples(stats, cfg.n_quantiles, cfg.examples_per_quantile, cfg.n_random, seed)
    used = np.unique(sel.ctx)
    ctx_text = dict(zip(used.tolist(), tokenizer.batch_decode([r[r >= 0].tolist() for r in table.tokens[used]]), strict=True))
    codes = CodeIndex(stats.codes, d)
    writer = ExamplesWriter(out_dir / "examples.parquet", table, ctx_text)
    shards = DashboardShards(dash_dir, text)
    alive = stats.fire_count > 0
    lm_set = set()
    if backend is not None and cfg.n_explain:
        perm = np.random.default_rng(seed).permutation(d)  # seeded, so a larger n_explain extends the set
        lm_set = set(perm[alive[perm]][: cfg.n_explain].tolist())
    results: dict[int, dict[str, Any]] = {}
    ex_tokens: dict[int, list[str]] = {}
    lm = _LMRunner(backend, text, cfg, seed, dataset.hook, len(lm_set))
    bounds = np.searchsorted(sel.feature, np.arange(0, d + FEATURE_BLOCK, FEATURE_BLOCK))
    feature_progress = Progress(f"interpret {dataset.hook} features", d, unit="features", tokens_per_unit=None)
    for b in range(len(bounds) - 1):
        block = sel.take(np.arange(bounds[b], bounds[b + 1]))
        acts = codes.gather(block, table.context_length)  # [E, T]
        writer.write(block, acts)
        tokens = table.tokens[block.ctx]
        starts = np.searchsorted(block.feature, np.arange(b * FEATURE_BLOCK, min(d, (b + 1) * FEATURE_BLOCK) + 1))
        for j in range(b * FEATURE_BLOCK, min(d, (b + 1) * FEATURE_BLOCK)):
            lo, hi = starts[j - b * FEATURE_BLOCK], starts[j - b * FEATURE_BLOCK + 1]
            topic = labels[best_idx[j]] if best_idx[j] >= 0 else None
            promoted = [text.get(int(t), "") for t in top_ids[j]]
            ev = split_evidence(j, block.kind[lo:hi], block.rank[lo:hi], block.ctx[lo:hi], tokens[lo:hi], acts[lo:hi],
                                topic, float(best_au[j]), promoted)
            if alive[j]:
                ex_tokens[j] = top_example_tokens(block.kind[lo:hi], block.rank[lo:hi], tokens[lo:hi], acts[lo:hi], text)
                results[j] = stats_explain_and_score(ev, norm_text, sim, seed)
                if j in lm_set:  # explained here, so the dashboard shard shows the LM's explanation
                    lm.run(j, ev, results)
            shards.add(j, dashboard_payload(j, block, lo, hi, tokens, acts, table, stats, results.get(j, {}), labels, auroc,
                                   (top_ids, top_logits, bot_ids, bot_logits), (nb_ids, nb_cos), (co_ids, co_j), text, shards, cfg.examples_per_quantile))
        shards.flush(upto_feature=min(d, (b + 1) * FEATURE_BLOCK))
        feature_progress.update(min(d, (b + 1) * FEATURE_BLOCK) - b * FEATURE_BLOCK)
    feature_progress.close()
    writer.close()
    shards.flush()
    lm.close()
    t_stats = time.perf_counter() - t0 - lm.seconds

    cols = feature_columns(d, stats, results, labels, auroc, best_idx, best_au, top_ids, top_logits, bot_ids,
                            bot_logits, nb_ids, nb_cos, co_ids, co_j, text, ex_tokens)
    atomic_write_parquet(out_dir / "features.parquet", features_table(cols), compression="zstd")
    primary = backend.name if backend is not None else "stats"
    explained = [j for j, r in results.items() if r.get("explainer") == primary]
    scores = {s: np.array([results[j].get(s, np.nan) for j in explained], dtype=np.float64) for s in SCORES}
    metrics = summary_metrics(stats.fire_count, stats.n_tokens, best_au, scores, primary, len(explained))
    write_dashboard_index(dash_dir, dataset.hook, cols, metrics)
    log.info("interpret %s: non-LM parts in %.1fs", dataset.hook, t_stats)
    return metrics


def _counted(progress: Progress, acts: torch.Tensor, *rest: Any) -> tuple[Any, ...]:
    """``(acts, *rest)``, after counting ``acts``' rows [N, d_in] as done."""
    progress.update(int(acts.shape[0]))
    return (acts, *rest)


class _LMRunner:
    """Explain-and-score features with an LM backend, flushing its cache after each feature (so a later
    failure keeps the work done) and timing it apart from the non-LM parts."""

    def __init__(self, backend: Cached | None, text: dict[int, str], cfg: InterpretParams, seed: int, hook: str,
                 total: int) -> None:
        self.backend, self.text, self.cfg, self.seed, self.hook, self.total = backend, text, cfg, seed, hook, total
        self.seconds, self.done, self.fresh = 0.0, 0, 0

    def run(self, j: int, ev: Any, results: dict[int, dict[str, Any]]) -> None:
        assert self.backend is not None
        t, misses = time.perf_counter(), self.backend.misses
        try:
            results[j] = lm_explain_and_score(ev, self.backend, self.text, self.cfg.max_new_tokens, self.seed)
        finally:
            self.backend.flush()
            self.seconds += time.perf_counter() - t
        self.done += 1
        self.fresh += self.backend.misses > misses
        log.info("interpret %s: LM feature %d (%d/%d, %.0fs): %s", self.hook, j, self.done, self.total, self.seconds,
                 results[j]["explanation"])

    def close(self) -> None:
        if self.done and self.backend is not None:
            log.info("interpret %s: %d LM explanations (%d not cached) in %.1fs: %.2f explanations/min (%s)", self.hook,
                     self.done, self.fresh, self.seconds, 60 * self.done / max(self.seconds, 1e-9), self.backend.name)
