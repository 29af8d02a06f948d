"""One hook's SAE through every eval of the bench stage, and its SAEBench result files.

A transcoder (keyed by its input hook ``layers.{i}.mlp_in``, :mod:`pipeline.site`): sparse probing pools its latents
of the MLP input (against the MLP input itself as the raw-activation baseline); the core numbers measure it as its
MLP's replacement (prediction against the MLP output, the spliced model with the MLP output replaced); absorption is
not evaluated (:data:`TRANSCODER_ABSORPTION`).

Data locations come in as arguments (the stage passes ``pipeline.paths``); the model is loaded once
by the caller and shared by every hook.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.saebench import core, probing, results, run
from pipeline.site import site_of

log = logging.getLogger(__name__)


@dataclass
class HookInputs:
    """What one hook's evals read: the SAE folder, its activation datasets (train, validation), the
    contexts and documents tables, the interpret stage's ``features.parquet`` (may be absent)."""

    sae_dir: Path
    datasets: list[Any]
    contexts: Any
    documents: Any
    features: Path
    targets: list[Any] | None = None  # a transcoder's MLP-output datasets (train, validation): same rows as datasets


@dataclass
class RunInfo:
    """The run-wide settings the result files record."""

    model_name: str
    model_dtype: str
    corpus: str
    context_length: int
    seed: int


TRANSCODER_ABSORPTION = ("absorption not evaluated: a transcoder's decoder rows write the MLP output, so they do not "
                         "split the MLP input's first-letter probe direction among latents as the eval assumes")


def bench_hook(hook: str, sae: Any, inp: HookInputs, model: Any, tokenizer: Any, special: frozenset[int],
               splice_contexts: torch.Tensor, cfg: run.BenchConfig, info: RunInfo, device: torch.device,
               eval_results: Path) -> dict[str, Any]:
    """Sparse probing, absorption and core for one SAE; writes its result files under ``eval_results``;
    returns the hook's entry of ``results/bench.json``."""
    seconds: dict[str, float] = {}
    # Off a terminal (dvc repro) a line every few seconds through the four phases: pooling, probing, absorption, core.
    progress = Progress(f"bench {hook}", 4, unit="phases", tokens_per_unit=None)
    encode = run.encoder(sae, cfg.encode_dtype, device)
    d_sae = int(sae.W_dec.shape[0])
    pooled = run.timed(lambda: run.probe_documents(inp.datasets, inp.contexts, inp.documents, special, encode, d_sae,
                                                   cfg, info.seed, cfg.batch_size), "pooling", seconds)
    progress.update(1)
    res = run.timed(lambda: probing.sparse_probing(pooled.llm, pooled.sae, pooled.labels, pooled.split,
                                                   list(cfg.k_values), info.seed, cfg.bootstrap_resamples),
                    "probing", seconds)
    progress.update(1)
    m: dict[str, Any] = run.probing_metrics(res)
    m["n_probe_documents"] = int(len(pooled.doc_ids))
    site = site_of(sae, hook)
    if site.paired and inp.targets is None:
        raise UserError(f"bench: the transcoder at {hook} predicts {site.write}: its activations are needed too "
                        f"(add {site.write} to extract.hooks)")
    if site.paired:
        ab: dict[str, Any] = {"mean": None, "note": TRANSCODER_ABSORPTION}
        m["absorption_note"] = TRANSCODER_ABSORPTION
    else:
        W_dec = sae.W_dec.detach().float().cpu().numpy()
        ab = run.timed(lambda: run.absorption_eval(model, tokenizer, hook, encode, W_dec, cfg, info.seed, device),
                       "absorption", seconds)
        m.update(run.absorption_metrics(ab))
    progress.update(1)
    if ab["note"]:
        log.warning("%s: %s", hook, ab["note"])

    def reconstruct(h: torch.Tensor) -> torch.Tensor:  # a transcoder: MLP input -> predicted MLP output
        return sae(h.to(sae.dtype)).float()

    def decode(f: torch.Tensor) -> torch.Tensor:
        return sae.decode(f.to(device)).float().cpu()

    def skip(x: torch.Tensor) -> torch.Tensor:  # a transcoder's linear skip term (zeros without one)
        return sae.skip_out(x.to(device)).float().cpu()

    def core_numbers() -> tuple[dict[str, float], dict[str, float]]:
        val = inp.datasets[-1].iter_batches(cfg.batch_size, shuffle=False)
        if site.paired:
            assert inp.targets is not None
            tgt = inp.targets[-1].iter_batches(cfg.batch_size, shuffle=False)
            batches: Any = ((b.acts, b.token_id, _aligned(b, y, inp.targets[-1].root).acts) for b, y in zip(val, tgt, strict=True))
        else:
            batches = ((b.acts, b.token_id) for b in val)
        with torch.no_grad():
            stats = core.reconstruction_stats(batches, encode, decode, d_sae, special, cfg.core_tokens,
                                              skip if site.paired else None)
            return stats, core.splice_kl_ce(model, site if site.paired else hook, reconstruct, splice_contexts, special)

    stats, splice = run.timed(core_numbers, "core", seconds)
    progress.update(1)
    progress.close()
    m["core_ce_loss_score"], m["core_kl_div_score"] = splice["ce_loss_score"], splice["kl_div_score"]
    sae_cfg = results.sae_cfg_dict(json.loads((inp.sae_dir / "cfg.json").read_text()), info.model_name, info.model_dtype)
    write_files(eval_results, hook, sae, sae_cfg, res, ab, stats, splice, inp.features, info, cfg)
    log.info("%s: sae_top_1 %.3f llm_top_1 %.3f sae %.3f llm %.3f; absorption %s; %s", hook,
             res["mean"].get("sae_top_1_test_accuracy", float("nan")),
             res["mean"].get("llm_top_1_test_accuracy", float("nan")), res["mean"]["sae_test_accuracy"],
             res["mean"]["llm_test_accuracy"],
             f"{ab['mean']['mean_absorption_fraction_score']:.3f}" if ab["mean"] else "not evaluated",
             ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return m


def _aligned(x: Any, y: Any, root: Any) -> Any:
    """``y`` (a target batch) after checking it holds ``x``'s rows."""
    if not (torch.equal(x.context_id, y.context_id) and torch.equal(x.position, y.position)):
        raise UserError(f"{root}: rows not aligned with the transcoder's input dataset; extract both hooks in one "
                        "`sae extract`")
    return y


def write_files(root: Path, hook: str, sae: Any, sae_cfg: dict[str, Any], res: dict[str, Any], ab: dict[str, Any],
                stats: dict[str, float], splice: dict[str, float], features: Path, info: RunInfo,
                cfg: run.BenchConfig) -> None:
    """The SAEBench result files of one hook (absorption only when evaluated; autointerp when interpret ran)."""
    common = {"model_name": info.model_name, "llm_dtype": info.model_dtype}
    core_cfg = {**common, "batch_size_prompts": 8, "n_eval_reconstruction_batches": 1,
                "n_eval_sparsity_variance_batches": 1, "dataset": info.corpus, "context_size": info.context_length,
                "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True, "compute_sparsity_metrics": True,
                "compute_variance_metrics": True, "compute_featurewise_density_statistics": False,
                "compute_featurewise_weight_based_metrics": True, "exclude_special_tokens_from_reconstruction": True,
                "verbose": False}
    results.write(root, "core", hook, results.core_file(stats, splice, run.feature_metrics(sae), core_cfg, hook, sae_cfg))
    sp_cfg = {**common, "random_seed": info.seed, "dataset_names": [f"{info.corpus}: labels"],
              "probe_train_set_size": 0, "probe_test_set_size": int(sum(res["n_test"].values())),
              "context_length": info.context_length, "sae_batch_size": cfg.batch_size, "llm_batch_size": None,
              "k_values": list(cfg.k_values), "lower_vram_usage": False}
    results.write(root, "sparse_probing", hook, results.sparse_probing_file(res, sp_cfg, hook, sae_cfg, list(cfg.k_values)))
    ab_cfg = {**common, "random_seed": info.seed, "f1_jump_threshold": 0.03, "max_k_value": 10,
              "prompt_template": "{word} has the first letter:", "prompt_token_pos": -1,
              "llm_batch_size": cfg.absorption_batch_size, "k_sparse_probe_l1_decay": 0.01,
              "k_sparse_probe_batch_size": 4096, "k_sparse_probe_num_epochs": 50, "min_GT_probe_f1": 0.6,
              "min_feats_for_eval": cfg.absorption_min_letters, "eval_k_sparse_probe_batch_size": 24,
              "precalc_k_sparse_probe_sae_acts": True}
    payload = results.absorption_file(ab, ab_cfg, hook, sae_cfg)
    stale = results.result_path(root, "absorption", hook)
    if payload is not None:
        results.write(root, "absorption", hook, payload)
    elif stale.exists():
        stale.unlink()  # an earlier run's file would claim a number this run could not compute
    ai = run.autointerp_from_features(features)
    if ai is not None:
        ai_cfg = {**common, "n_latents": ai[2], "override_latents": None, "dead_latent_threshold": 0.0,
                  "random_seed": info.seed, "dataset_name": info.corpus, "llm_context_size": info.context_length,
                  "llm_batch_size": 1, "buffer": 0, "no_overlap": True, "act_threshold_frac": 0.0, "total_tokens": 0,
                  "scoring": True, "max_tokens_in_explanation": 0, "use_demos_in_explanation": False,
                  "n_top_ex_for_generation": 0, "n_iw_sampled_ex_for_generation": 0, "n_top_ex_for_scoring": 0,
                  "n_random_ex_for_scoring": 0, "n_iw_sampled_ex_for_scoring": 0}
        results.write(root, "autointerp", hook, results.autointerp_file(*ai, ai_cfg, hook, sae_cfg))


__all__ = ["HookInputs", "RunInfo", "TRANSCODER_ABSORPTION", "bench_hook", "write_files"]
