"""The sweep: every (feature, method, coefficient, prompt) generated, re-encoded and scored.

For one feature, all rows of a prompt — an unsteered reference row plus every method x coefficient —
form one left-padded batch, so the prefill of the reference row gives the clean next-token
distributions that the KL side effect needs, and the reference continuation's perplexity normalises
fluency. Rows of several prompts share a batch up to ``batch_size``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.hooks import intervene
from pipeline.metrics import special_mask
from pipeline.site import Site, as_site
from pipeline.steering.generate import Batch, continuation_nll, generate, left_pad
from pipeline.steering.interventions import RowSteering, SAELike, steer
from pipeline.steering.metrics import (
    TopicModel,
    concept_stats,
    distinct_n,
    kl_divergence,
    other_features_change,
    perplexity,
)

log = logging.getLogger(__name__)

__all__ = ["FeaturePlan", "SweepConfig", "SweepTiming", "Prompt", "run_sweep", "ablation_effect"]


@dataclass
class FeaturePlan:
    feature: int
    topic: str | None
    scale: float  # m_f, feature units
    directions: dict[str, Tensor]  # method -> additive vector at coefficient 1 (shape: [d_in], float32)


@dataclass
class Prompt:
    prompt_id: int
    text: str
    split: str  # "validation" | "test"
    ids: list[int]


@dataclass
class SweepConfig:
    hook: str | Site  # a transcoder's site: steered at its write hook, re-encoded at its read hook
    methods: list[str]
    coefficients: list[float]
    positions: str = "all"
    max_new_tokens: int = 24
    do_sample: bool = False
    temperature: float = 1.0
    batch_size: int = 64
    seed: int = 0


@dataclass
class SweepTiming:
    """Wall-clock cost of generation (kept out of the metrics: a rerun must reproduce those byte for byte)."""

    generate_s: float = 0.0
    tokens: int = 0  # generated tokens
    rows: int = 0  # generations

    def __add__(self, other: SweepTiming) -> SweepTiming:
        return SweepTiming(self.generate_s + other.generate_s, self.tokens + other.tokens, self.rows + other.rows)


def _row_specs(cfg: SweepConfig) -> list[tuple[str, float]]:
    return [("none", 0.0)] + [(m, float(c)) for m in cfg.methods for c in cfg.coefficients]


def _chunks(prompts: list[Prompt], per_prompt: int, batch_size: int) -> list[list[Prompt]]:
    out: list[list[Prompt]] = [[]]
    for p in prompts:
        if out[-1] and (len(out[-1]) + 1) * per_prompt > batch_size:
            out.append([])
        out[-1].append(p)
    return out


@torch.no_grad()
def run_sweep(model: nn.Module, tokenizer: Any, sae: SAELike, plan: FeaturePlan, prompts: list[Prompt],
              cfg: SweepConfig, topic_model: TopicModel | None) -> tuple[list[dict[str, Any]], SweepTiming]:
    """All rows for one feature: generations with their raw metrics (fluency/hm are added later), and the
    time their generation took."""
    specs = _row_specs(cfg)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + plan.feature)
    rows: list[dict[str, Any]] = []
    timing = SweepTiming()
    t_idx = topic_model.topics.index(plan.topic) if topic_model is not None and plan.topic in topic_model.topics else None
    seen: dict[str, Tensor] = {}
    site = as_site(cfg.hook)

    def record(h: Tensor) -> Tensor:  # keeps the read hook's activation of the scoring forward
        seen["h"] = h
        return h

    for chunk in _chunks(prompts, len(specs), cfg.batch_size):
        seqs = [p.ids for p in chunk for _ in specs]
        batch = left_pad(seqs, pad, device)
        B, T = batch.input_ids.shape
        add = torch.zeros(B, sae.W_dec.shape[1])
        clamp = torch.full((B,), float("nan"))
        for i, (m, c) in enumerate(specs * len(chunk)):
            if m == "clamp":
                clamp[i] = c * plan.scale
            elif m != "none":  # every other method adds its direction
                add[i] = c * plan.directions[m]
        start = 0 if cfg.positions == "all" else T - 1  # 'generated': last prompt token onwards
        steering = RowSteering(sae, plan.feature, add.to(device), clamp.to(device), start)
        t0 = time.perf_counter()
        with steer(model, cfg.hook, steering):
            new, prompt_logits = generate(model, batch, cfg.max_new_tokens, cfg.do_sample, cfg.temperature, gen)
        timing += SweepTiming(time.perf_counter() - t0, new.numel(), B)
        # Side effects on the prompt: clean = the reference ('none') row of the same prompt.
        ref = torch.arange(B, device=device) // len(specs) * len(specs)  # [B]
        edited = batch.attention_mask.bool() & (torch.arange(T, device=device) >= start)[None]  # [B, T]
        kl = kl_divergence(prompt_logits[ref], prompt_logits, edited)
        assert steering.first_in is not None and steering.first_out is not None
        if site.paired:
            # A transcoder's latents are read from the MLP input of the steered forward, upstream of the edit at
            # the MLP output: the other latents at the prompt cannot change (other_features@2 is 0 by construction).
            assert steering.first_src is not None
            f_in = f_out = sae.encode(steering.first_src.float()).float()  # [B, T, d_sae]
        else:
            f_in = sae.encode(steering.first_in.float()).float()  # [B, T, d_sae]
            f_out = sae.encode(steering.first_out.float()).float()
        other = other_features_change(f_in, f_out, plan.feature, edited)
        # Score continuations on the unsteered model: perplexity and the feature re-encoded.
        full = Batch(torch.cat([batch.input_ids, new], 1), torch.cat([batch.attention_mask, torch.ones_like(new)], 1))
        with intervene(model, site.read, record):
            nll = continuation_nll(model, full, new.shape[1])  # [B, N]
        f_cont = sae.encode(seen["h"][:, -new.shape[1]:].float().contiguous())[..., plan.feature]  # [B, N]
        c_act, c_frac = concept_stats(f_cont, plan.scale if plan.scale > 0 else 1.0)
        ppl = perplexity(nll)
        new_np = new.cpu().numpy()
        distinct = distinct_n(new_np, 2)
        topic_p = topic_model.scores(new_np)[:, t_idx] if topic_model is not None and t_idx is not None else None
        for i, (m, c) in enumerate(specs * len(chunk)):
            p = chunk[i // len(specs)]
            rows.append({
                "prompt_id": p.prompt_id, "prompt": p.text, "split": p.split, "feature": plan.feature,
                "topic": plan.topic, "method": m, "coefficient": c,
                "text": tokenizer.decode(new_np[i].tolist(), skip_special_tokens=True),
                "token_ids": new_np[i].tolist(),
                "concept_act@2": float(c_act[i]), "concept_frac@2": float(c_frac[i]),
                "topic_score@2": float(topic_p[i]) if topic_p is not None else math.nan,
                "perplexity@2": float(ppl[i]), "distinct2@2": float(distinct[i]), "kl@2": float(kl[i]), "other_features@2": float(other[i]),
            })
    return rows, timing


@torch.no_grad()
def ablation_effect(model: nn.Module, sae: SAELike, hook: str | Site, feature: int, fire_ids: list[list[int]],
                    quiet_ids: list[list[int]], batch_size: int = 8, special_ids: Collection[int] = ()
                    ) -> dict[str, float]:
    """Change of mean next-token loss when ``feature`` is ablated (set to 0, SAE error kept).

    :param fire_ids: token ids of contexts where the feature fires; ``quiet_ids`` where it does not.
    :param special_ids: token ids (BOS/EOS/PAD) whose positions keep their activation and whose
        predictions are not averaged: the statistics that chose the contexts leave them out too.
    Returns ``ablation_dloss_fire@2``, ``ablation_dloss_nofire@2`` (nats/token) and their difference
    ``ablation_effect@2``. On contexts where the feature never fires ablation changes nothing by
    construction, so the 'nofire' number is a check that the intervention is local.
    """
    device = next(model.parameters()).device

    def dloss(seqs: list[list[int]]) -> float:
        if not seqs:
            return math.nan
        out: list[Tensor] = []
        for s in range(0, len(seqs), batch_size):
            batch = left_pad(seqs[s:s + batch_size], 0, device)
            n = batch.width - 1
            clean = continuation_nll(model, batch, n)  # [b, n]
            zero = torch.zeros(batch.input_ids.shape[0], device=device)
            special = special_mask(batch.input_ids, special_ids) & batch.attention_mask.bool()  # [b, T]
            with steer(model, hook, RowSteering(sae, feature, None, zero, 0, frozen=special)):
                ablated = continuation_nll(model, batch, n)
            # positions whose target is a real token, predicted from a non-special one
            m = (batch.attention_mask[:, 1:].bool() & ~special[:, :-1]).float()
            out.append(((ablated - clean) * m).sum(-1) / m.sum(-1).clamp(min=1))
        return float(torch.cat(out).mean())

    fire, quiet = dloss(fire_ids), dloss(quiet_ids)
    return {"ablation_dloss_fire@2": fire, "ablation_dloss_nofire@2": quiet,
            "ablation_effect@2": fire - quiet if not (math.isnan(fire) or math.isnan(quiet)) else math.nan}


def seeded_prompts(texts: list[str], tokenizer: Any, validation_fraction: float, seed: int,
                   bos: bool = True) -> list[Prompt]:
    """Shuffle prompts by seed, split into validation and test (each non-empty), tokenise."""
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = min(max(1, round(validation_fraction * len(texts))), len(texts) - 1)
    out = []
    for rank, i in enumerate(order):
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids  # contexts were extracted with BOS first
        out.append(Prompt(int(i), texts[i], "validation" if rank < n_val else "test", ids))
    return out
