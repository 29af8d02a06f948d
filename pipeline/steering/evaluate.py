"""The whole steering evaluation as one library call (the ``steer`` stage only loads inputs and writes outputs).

statistics pass → feature choice and scales → baseline directions → topic model → sweep (generate,
re-encode, score; optionally the LLM judge) → ablation effect → coefficient and SAE-method choice on
validation prompts, report on test with bootstrap intervals → likelihood evidence on every corpus label
(``steer.likelihood``: matched-KL steering and ablation against baselines, the primary result).

A transcoder is steered where it writes (:mod:`pipeline.site`): every method, baselines included, edits block i's
MLP output ``layers.{i}.mlp_out``, and its latents are read from the MLP input ``layers.{i}.mlp_in``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from pipeline.activations import ActivationDataset
from pipeline.errors import UserError
from pipeline.hooks import final_norm_and_unembed
from pipeline.io import nan_to_null
from pipeline.params.analysis import SteerParams
from pipeline.progress import Progress
from pipeline.site import site_of
from pipeline.steering.baselines import dim_direction, feature_topics, random_direction, select_features
from pipeline.steering.decide import decide
from pipeline.steering.evidence import run_evidence
from pipeline.steering.interventions import SAELike, feature_write
from pipeline.steering.judge import JUDGE_COLUMNS, PROMPT_VERSION, TextBackend, judge_rows
from pipeline.steering.metrics import TopicModel, label_windows
from pipeline.steering.protocol import (
    FeaturePlan,
    SweepConfig,
    SweepTiming,
    ablation_effect,
    run_sweep,
    seeded_prompts,
)
from pipeline.steering.stats import collect_stats, label_grid
from pipeline.steering.summary import add_scores, choose_and_report
from pipeline.tokens import special_token_ids

log = logging.getLogger(__name__)

__all__ = ["SteeringResult", "evaluate_steering"]


@dataclass
class SteeringResult:
    generations: pl.DataFrame  # one row per (feature, method, coefficient, prompt)
    metrics: dict[str, Any]  # metrics/steer.json, complete (NaN already null)
    runtime: dict[str, Any]  # wall-clock numbers: kept out of the metrics so a rerun reproduces them byte for byte
    likelihood: pl.DataFrame | None = None  # one row per (concept, method, coefficient, test text)
    ablation: pl.DataFrame | None = None  # one row per (concept, ablation variant, window)


def _topic_model(contexts: pl.DataFrame, rows: dict[int, int], grid: np.ndarray, topics: list[str],
                 vocab: int, window: int) -> tuple[TopicModel, float]:
    """Fit on the train split's tokens, measure accuracy on validation windows of ``window`` tokens."""
    out = {}
    for split in ("train", "validation"):
        c = contexts.filter(pl.col("split") == split)
        toks = np.array(c["token_ids"].to_list(), dtype=np.int64).reshape(len(c), -1)
        labs = grid[[rows[int(i)] for i in c["context_id"].to_list()]][:, : toks.shape[1]] if len(c) else np.zeros_like(toks)
        out[split] = (toks, labs)
    model = TopicModel.fit(out["train"][0], out["train"][1], topics, vocab)
    return model, model.accuracy(*label_windows(*out["validation"], window))


def judge_concepts(features: list[int], feat_topic: dict[int, str | None], interp: pl.DataFrame | None) -> dict[int, str]:
    """The concept the judge looks for in every method's generations of a feature.

    The feature's topic when it has one: that is what ``dim`` steers towards and what ``concept@2``
    measures, so all methods are judged on the same question. Else interpretation's explanation.
    """
    expl: dict[int, str] = {}
    if interp is not None and "explanation" in interp.columns:
        expl = {int(f): str(e).strip() for f, e in zip(interp["feature"], interp["explanation"], strict=True)
                if e is not None and str(e).strip()}
    out = {}
    for f in features:
        concept = feat_topic.get(f) or expl.get(f)
        if not concept:
            raise UserError(f"steer.judge: feature {f} has neither a topic nor an explanation to judge against "
                            "(run `sae interpret` first, or set steer.judge: none)")
        out[f] = concept
    return out


def evaluate_steering(model: nn.Module, tokenizer: Any, sae: SAELike, hook: str, contexts: pl.DataFrame,
                      documents: pl.DataFrame, acts: ActivationDataset, interp: pl.DataFrame | None,
                      p: SteerParams, seed: int, bos: bool = True, judge: TextBackend | None = None,
                      model_info: Mapping[str, str] | None = None,
                      write_acts: ActivationDataset | None = None) -> SteeringResult:
    """Run the protocol of ``p`` (see ``SteerParams``) for the SAE at ``hook``; ``judge``: the LLM judge's
    backend (``steer.judge``), or None to leave it out; ``model_info``: recorded as ``model`` in the metrics.
    ``acts`` are the activations the SAE encodes; for a transcoder ``write_acts`` those of the hook it writes
    (its MLP output, the same rows), where the difference-in-means baseline is measured.

    The tokenizer's BOS/EOS/PAD positions enter no feature statistic (m_f, firing, the difference in
    means, the ablation contexts) and are not ablated, as ``evaluate`` leaves them out of its metrics."""
    t_start = time.perf_counter()
    special = special_token_ids(tokenizer)
    topics, rows, grid = label_grid(contexts, documents)
    site = site_of(sae, hook)
    if site.paired and write_acts is None:
        raise UserError(f"steer: the transcoder at {hook} writes {site.write}: its activations are needed too "
                        f"(add {site.write} to extract.hooks)")
    stats = collect_stats(sae, acts, topics, rows, grid, p.stats_max_tokens, special_ids=special,
                          write_ds=write_acts if site.paired else None)
    if not topics and "dim" in p.methods:
        raise UserError("steer.methods: 'dim' needs a labelled corpus (corpus.label_column); remove it")
    features = select_features(stats, interp, p.features, p.n_features, p.select_by, p.min_firing)
    if not features:
        raise UserError(f"steer: no feature fires at least steer.min_firing={p.min_firing} times; list steer.features")
    feat_topic = feature_topics(stats, interp, features)
    concepts = judge_concepts(features, feat_topic, interp) if judge is not None else {}
    vocab = int(final_norm_and_unembed(model)[1].shape[0])
    topic_model, topic_acc = _topic_model(contexts, rows, grid, topics, vocab, p.max_new_tokens) if topics else (None, math.nan)
    prompts = seeded_prompts(p.prompts, tokenizer, p.validation_fraction, seed, bos)
    cfg = SweepConfig(site if site.paired else hook, list(p.methods), list(p.coefficients), p.positions, p.max_new_tokens,
                      p.do_sample, p.temperature, p.batch_size, seed)
    all_rows: list[dict[str, Any]] = []
    per_feature_extra: dict[str, dict[str, Any]] = {}
    ctx_tokens = dict(zip(contexts["context_id"].to_list(), contexts["token_ids"].to_list(), strict=True))
    t_ablate = t_judge = 0.0
    timing = SweepTiming()
    unparsed = 0
    # Off a terminal (dvc repro) a line every few seconds: one feature's sweep takes tens of seconds on a CPU.
    progress = Progress(f"steer {hook}", len(features), unit="features", tokens_per_unit=None)
    for f in features:
        scale = stats.scale(f, p.scale, p.scale_quantile)
        if scale <= 0:
            raise UserError(f"steer.features: feature {f} never fires on the {p.stats_split} split, so it has no scale")
        write = feature_write(sae, f, scale).cpu()  # [d_in]
        norm = float(write.norm())
        dirs = {"add": write}
        if "dim" in p.methods:
            if feat_topic[f] is None:
                raise UserError(f"steer.methods: 'dim' needs two labelled topics in the {p.stats_split} split; remove 'dim' or use more data")
            dirs["dim"] = torch.from_numpy(dim_direction(stats, feat_topic[f])).float() * norm  # type: ignore[arg-type]
        if "random" in p.methods:
            dirs["random"] = torch.from_numpy(random_direction(write.shape[0], seed * 7919 + f)).float() * norm
        plan = FeaturePlan(f, feat_topic[f], scale, dirs)
        log.info("steering feature %d (topic %s, m_f %.3g, |write| %.3g)", f, feat_topic[f], scale, norm)
        sweep, t = run_sweep(model, tokenizer, sae, plan, prompts, cfg, topic_model)
        timing += t
        if judge is not None:
            t0 = time.perf_counter()
            unparsed += judge_rows(judge, sweep, concepts[f])
            t_judge += time.perf_counter() - t0
            flush = getattr(judge, "flush", None)
            if flush is not None:
                flush()  # a later failure keeps this feature's answers
        all_rows.extend(sweep)
        # Ablation effect on the strongest-firing contexts vs seeded contexts where it never fires.
        t0 = time.perf_counter()
        cmax = stats.context_max[:, f]
        order = np.argsort(-cmax, kind="stable")
        fire_ids = [int(stats.context_ids[i]) for i in order[: p.ablation_contexts] if cmax[i] > 0]
        quiet_pool = stats.context_ids[cmax == 0]
        rng = np.random.default_rng(seed + f)
        quiet_ids = [int(c) for c in rng.permutation(quiet_pool)[: p.ablation_contexts]]
        abl = ablation_effect(model, sae, site, f, [ctx_tokens[c] for c in fire_ids], [ctx_tokens[c] for c in quiet_ids],
                              special_ids=special)
        t_ablate += time.perf_counter() - t0
        per_feature_extra[str(f)] = {"scale@2": scale, "write_norm@2": norm, "fire_rate@2": float(stats.fire_count[f] / stats.n_tokens),
                                     "ablation_contexts": [len(fire_ids), len(quiet_ids)], **abl}
        progress.update(1)
    progress.close()
    df = pl.DataFrame(all_rows, infer_schema_length=None)
    if judge is not None:  # fixed dtypes even when every answer of a column was unparseable (all None)
        df = df.with_columns(*(pl.col(c).cast(pl.Int64) for c in JUDGE_COLUMNS[:3]), pl.col("judge_hm").cast(pl.Float64))
    df = add_scores(df)
    report = choose_and_report(df, seed, p.bootstrap_resamples)
    for key, extra in per_feature_extra.items():
        report["features"][key].update(extra)
    report["settings"] = {"hook": hook, "features": features, "methods": list(p.methods),
                          "coefficients": list(p.coefficients), "positions": p.positions, "scale": p.scale,
                          "n_prompts": {"validation": sum(q.split == "validation" for q in prompts),
                                        "test": sum(q.split == "test" for q in prompts)},
                          "stats_tokens": stats.n_tokens}
    if site.paired:  # a transcoder: latents read at `hook`, every method written here
        report["settings"]["write_hook"] = site.write
    report["topic_model_accuracy@1"] = topic_acc
    if judge is not None:
        report["judge"] = {"backend": judge.name, "prompt_version": PROMPT_VERSION,
                           "concepts": {str(f): c for f, c in concepts.items()},
                           "ratings": 3 * len(df), "unparsed": unparsed}
        if unparsed:
            log.warning("steer.judge: %d of %d answers had no 0-2 rating (recorded as null)", unparsed, 3 * len(df))
    if model_info is not None:
        report["model"] = dict(model_info)
    lik_tables: tuple[pl.DataFrame, pl.DataFrame] | None = None
    t_lik = 0.0
    if p.likelihood and topics:  # the primary evidence: every label, matched KL, ablation (pipeline/steering/decide.py)
        t0 = time.perf_counter()
        ev = run_evidence(model, tokenizer, sae, site, contexts, stats, interp, rows, grid, p, seed, special, bos)
        block, *tables = decide(ev, list(p.kl_budgets), p.verdict_kl, seed, p.bootstrap_resamples,
                                lambda ids: tokenizer.decode(ids))
        report["likelihood"] = block
        lik_tables = (tables[0], tables[1])
        t_lik = time.perf_counter() - t0
        log.info("steer (likelihood): %s", block.get("verdict_text", ""))
    elif p.likelihood:
        report["likelihood"] = {"verdict_text": "not run: the corpus has no labels to take concepts from"}
    runtime = {"generations": timing.rows, "generated_tokens": timing.tokens, "generate_s": round(timing.generate_s, 2),
               "generate_tokens_per_s": round(timing.tokens / max(timing.generate_s, 1e-9), 1),
               "ablation_s": round(t_ablate, 2), "likelihood_s": round(t_lik, 2), **({"judge_s": round(t_judge, 2)} if judge is not None else {}),
               "total_s": round(time.perf_counter() - t_start, 2)}
    log.info("steer: %s", report["overall"].get("summary", ""))
    return SteeringResult(df, nan_to_null(report), nan_to_null(runtime), *(lik_tables or (None, None)))
