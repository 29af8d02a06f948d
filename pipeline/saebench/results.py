"""SAEBench result files: ``eval_results/<eval>/<release>_<sae_id>_eval_results.json`` in its schema.

The layout and fields follow the JSON schemas shipped with ``sae-bench`` 0.6.0
(``evals/<eval>/eval_output_schema_*.json``), so SAEBench's reading and plotting code
(``sae_bench_utils.graphing_utils.get_eval_results`` / ``get_core_results``), Neuronpedia and
leaderboards read them. ``release`` is this pipeline, ``sae_id`` the hook; the ``core`` file of the same
name carries the L0 and CE loss score the others are plotted against. Where our recipe departs from
SAEBench's, ``eval_result_unstructured`` says how.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json

RELEASE = "sae-pipeline"
SAE_BENCH_VERSION = "0.6.0"  # the schema version these files follow
# Our architecture names -> SAEBench's (sae_cfg_dict["architecture"], what its plots group by).
ARCHITECTURES = {"relu_l1": "standard", "topk": "topk", "batchtopk": "batch_topk", "jumprelu": "jumprelu",
                 "gated": "gated", "matryoshka_batchtopk": "matryoshka_batch_topk"}


def result_name(hook: str, release: str = RELEASE) -> str:
    """``<release>_<sae_id>``, path-safe (SAEBench replaces '/' the same way)."""
    return f"{release}_{hook}".replace("/", "_")


def result_path(root: str | Path, eval_dir: str, hook: str) -> Path:
    return Path(root) / eval_dir / f"{result_name(hook)}_eval_results.json"


def sae_cfg_dict(cfg: dict[str, Any], model_name: str, dtype: str) -> dict[str, Any]:
    """SAELens-style config of our ``cfg.json``: SAEBench's architecture name, ``d_in``, ``d_sae``, hook, ..."""
    from pipeline.hooks import parse_hook

    hook = str(cfg.get("hook", ""))
    try:
        layer = parse_hook(hook).layer
    except Exception:  # a hook name without a layer (embed) has none
        layer = None
    training = cfg.get("training") or {}
    out = {
        "architecture": ARCHITECTURES.get(str(cfg.get("architecture")), str(cfg.get("architecture"))),
        "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "dtype": dtype, "model_name": model_name,
        "hook_name": hook, "hook_layer": layer, "hook_head_index": None, "activation_fn_str": "relu",
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input") or False), "normalize_activations": "none",
        "context_size": None, "prepend_bos": True, "device": "cpu", "neuronpedia_id": None,
        "training_tokens": int(training.get("n_tokens") or 0) or None, "source": RELEASE,
    }
    if cfg.get("architecture") in ("topk", "batchtopk"):
        out["k"] = cfg.get("k")
    if cfg.get("architecture") == "transcoder":
        # SAELens's transcoder names (SAEBench has none): what it reads (hook_name), what it predicts (hook_name_out).
        out["architecture"] = "skip_transcoder" if cfg.get("skip") else "transcoder"
        out["hook_name_out"] = str(cfg.get("hook_out") or "") or (f"layers.{layer}.mlp_out" if layer is not None else "")
        out["hook_layer_out"], out["d_out"], out["k"] = layer, cfg.get("d_in"), cfg.get("k")
        out["transcoder_activation"] = cfg.get("transcoder_activation")
    return out


def envelope(eval_type: str, config: dict[str, Any], metrics: dict[str, Any], details: list[dict[str, Any]],
             hook: str, cfg_dict: dict[str, Any], unstructured: Any = None) -> dict[str, Any]:
    """The fields every SAEBench result file has. ``datetime_epoch_millis`` and ``eval_id`` are the only
    values that change between identical runs."""
    return {
        "eval_type_id": eval_type, "eval_config": config, "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
        "eval_result_details": details, "sae_bench_commit_hash": f"sae-pipeline (schema of sae-bench {SAE_BENCH_VERSION})",
        "sae_lens_id": hook, "sae_lens_release_id": RELEASE, "sae_lens_version": None, "sae_cfg_dict": cfg_dict,
        "eval_result_unstructured": unstructured,
    }


def core_file(stats: dict[str, float], splice: dict[str, float], feature_metrics: list[dict[str, Any]],
              config: dict[str, Any], hook: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """``core``: ``stats`` from :func:`pipeline.saebench.core.reconstruction_stats`, ``splice`` from
    :func:`~pipeline.saebench.core.splice_kl_ce`, ``feature_metrics`` one dict per latent."""
    g = {**stats, **splice}
    pick = lambda *keys: {k: g[k] for k in keys}  # noqa: E731
    n_enc = [f["max_encoder_cosine_sim"] for f in feature_metrics]
    n_dec = [f["max_decoder_cosine_sim"] for f in feature_metrics]
    metrics = {
        "model_behavior_preservation": pick("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
        "model_performance_preservation": pick("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                               "ce_loss_without_sae"),
        "reconstruction_quality": pick("explained_variance", "explained_variance_legacy", "mse", "cossim"),
        "shrinkage": pick("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
        "sparsity": pick("l0", "l1"),
        "token_stats": {"total_tokens_eval_reconstruction": int(splice["n_predictions"]),
                        "total_tokens_eval_sparsity_variance": int(stats["n_tokens"])},
        "misc_metrics": {**pick("freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                                "normalized_freq_over_10_percent", "frac_alive"),
                         "average_max_encoder_cosine_sim": sum(n_enc) / max(len(n_enc), 1),
                         "average_max_decoder_cosine_sim": sum(n_dec) / max(len(n_dec), 1)},
    }
    note = ("explained_variance is 1 - FVU over all evaluated tokens; the zero-ablation baseline keeps BOS/EOS/PAD "
            "positions; consistent_activation_heuristic is not computed (0.0)")
    return envelope("core", config, metrics, feature_metrics, hook, cfg_dict, {"note": note})


def sparse_probing_file(result: dict[str, Any], config: dict[str, Any], hook: str, cfg_dict: dict[str, Any],
                        ks: list[int]) -> dict[str, Any]:
    """``sparse_probing``: SAEBench's named fields (k in its schema: 1, 2, 5, 10, 20, 50, 100) plus our
    L1-selected accuracies and bootstrap intervals under ``eval_result_unstructured``."""
    def part(values: dict[str, float], prefix: str) -> dict[str, float]:
        out = {f"{prefix}_test_accuracy": values[f"{prefix}_test_accuracy"]}
        out.update({f"{prefix}_top_{k}_test_accuracy": values[f"{prefix}_top_{k}_test_accuracy"]
                    for k in ks if f"{prefix}_top_{k}_test_accuracy" in values})
        return out

    metrics = {"llm": part(result["mean"], "llm"), "sae": part(result["mean"], "sae")}
    details = [{"dataset_name": f"corpus_labels: {lab}", **part(v, "llm"), **part(v, "sae")}
               for lab, v in result["per_label"].items()]
    extra = {"l1_selected": {k: v for k, v in result["mean"].items() if "_l1_" in k}, "ci95": result["ci"],
             "n_test_documents": result["n_test"], "note": (
                 "documents of this pipeline's corpus, one one-vs-rest task per label; full-width probes choose C on "
                 "a validation split (never on test); *_l1_top_k: latents chosen by an L1-penalised probe")}
    return envelope("sparse_probing", config, metrics, details, hook, cfg_dict, extra)


def absorption_file(result: dict[str, Any], config: dict[str, Any], hook: str, cfg_dict: dict[str, Any]) -> dict[str, Any] | None:
    """``absorption_first_letter``, or None when too few letters were present to evaluate (no file)."""
    if result["mean"] is None:
        return None
    details = [{"first_letter": letter, "mean_absorption_fraction": v["mean_absorption_fraction"],
                "full_absorption_rate": v["full_absorption_rate"], "num_full_absorption": v["num_full_absorption"],
                "num_probe_true_positives": v["num_probe_true_positives"], "num_split_features": len(v["split_feats"])}
               for letter, v in result["letters"].items() if v["present"]]
    return envelope("absorption_first_letter", config, {"mean": result["mean"]}, details, hook, cfg_dict,
                    {"note": "activations of the test prompts are reused for the absorption step (SAEBench builds new "
                             "prompts); the word's token position is computed for this tokenizer"})


def autointerp_file(score: float, std: float, n: int, explainer: str, scorer: str, config: dict[str, Any],
                    hook: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """``autointerp`` from the interpret stage's per-feature detection balanced accuracy."""
    comparable = not explainer.startswith("stats")
    note = (f"mean over {n} features of detection balanced accuracy, explainer {explainer!r}, scorer {scorer!r}. "
            + ("An LM explained and scored: close to SAEBench's detection score, but with this pipeline's prompts."
               if comparable else
               "NOT comparable with SAEBench's autointerp score: the default 'stats' explainer is not an LM and its "
               "scorer is a lexical simulator; set interpret.explainer to an LM for a comparable number."))
    return envelope("autointerp", config, {"autointerp": {"autointerp_score": score, "autointerp_std_dev": std}}, [],
                    hook, cfg_dict, {"note": note, "comparable_with_saebench": comparable})


def write(root: str | Path, eval_dir: str, hook: str, payload: dict[str, Any]) -> Path:
    path = result_path(root, eval_dir, hook)
    atomic_write_json(path, payload)
    return path


EVAL_DIRS = ("core", "sparse_probing", "absorption", "autointerp")

__all__ = ["RELEASE", "ARCHITECTURES", "EVAL_DIRS", "result_name", "result_path", "sae_cfg_dict", "envelope",
           "core_file", "sparse_probing_file", "absorption_file", "autointerp_file", "write"]
