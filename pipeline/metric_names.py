"""Metric names and what each means: the one table of definitions (the report prints it beside every value).

Every metric has a name ``<metric>@<version>``; the version changes whenever the definition changes,
so numbers in old DVC metrics files and MLflow runs stay comparable (or visibly not).
:data:`DEFINITIONS` is keyed by exact name (``fvu@1``, a retired version) or by base name (``fvu``,
the current meaning). The numbers are computed in :mod:`pipeline.metrics` (reconstruction, sparsity,
downstream loss; why these definitions is explained there), :mod:`pipeline.interpret.tables` and
:mod:`pipeline.steering`. No torch here, so the report reads the table without loading it.
"""

from __future__ import annotations

MSE = "mse@1"
UNCENTERED_NMSE = "uncentered_nmse@1"
FVU = "fvu@2"
L0 = "l0@1"
L1 = "l1@1"
DEAD_FRACTION = "dead_fraction@1"
DENSE_FRACTION = "dense_fraction@1"
SHRINKAGE = "shrinkage@1"
CE_LOSS_RECOVERED = "ce_loss_recovered@1"
KL_DIV = "kl_div@1"
DELTA_LM_LOSS = "delta_lm_loss@1"
MMCS = "mmcs@1"
CE_CLEAN = "ce_clean@1"
CE_SAE = "ce_sae@1"
CE_ZERO_ABLATION = "ce_zero_ablation@1"

DENSE_THRESHOLD = 0.1  # dense_fraction@1: fires on more than 10% of tokens

# All-token name -> the same definition over non-special tokens (evaluate.exclude_special_tokens; see
# pipeline.metrics): a different token set is a different definition, so the version goes up.
EXCLUDING_SPECIAL = {
    MSE: "mse@2", UNCENTERED_NMSE: "uncentered_nmse@2", FVU: "fvu@3", SHRINKAGE: "shrinkage@2",
    L0: "l0@2", L1: "l1@2", DEAD_FRACTION: "dead_fraction@2", DENSE_FRACTION: "dense_fraction@2",
    CE_LOSS_RECOVERED: "ce_loss_recovered@2", KL_DIV: "kl_div@2", DELTA_LM_LOSS: "delta_lm_loss@2",
    CE_CLEAN: "ce_clean@2", CE_SAE: "ce_sae@2", CE_ZERO_ABLATION: "ce_zero_ablation@2",
}
# All-token values still reported when special tokens are excluded: the headline triple and KL,
# so every run shows what the exclusion changes and stays comparable with runs made without it.
ALL_TOKEN_REFERENCE = (L0, FVU, CE_LOSS_RECOVERED, KL_DIV)
_SPLICED = (CE_LOSS_RECOVERED, KL_DIV, DELTA_LM_LOSS, CE_CLEAN, CE_SAE, CE_ZERO_ABLATION)  # need a model forward

DEFINITIONS = {
    "fvu": "Fraction of variance unexplained: squared residual summed over dimensions / total variance "
           "summed over dimensions (not a mean of per-dimension ratios). Lower is better.",
    "fvu@1": "Retired definition: mean over dimensions of per-dimension residual/variance ratios "
             "(not comparable with fvu@2).",
    "l0": "Mean number of active latents per token.",
    "l1": "Mean L1 norm of the latent activations per token.",
    "mse": "Mean over tokens and dimensions of (x - x_hat)^2.",
    "uncentered_nmse": "Sum of ||x - x_hat||^2 over tokens / sum of ||x||^2 (normalised by the raw second moment, "
                       "not the variance: not the FVU).",
    "nmse": "Former name of uncentered_nmse, same definition: sum of ||x - x_hat||^2 over tokens / sum of "
            "||x||^2 (renamed so it is not read as Gao et al.'s normalised MSE, which is the FVU).",
    "dead_fraction": "Fraction of latents that never fired on the evaluation tokens.",
    "dense_fraction": f"Fraction of latents firing on more than {DENSE_THRESHOLD:.0%} of tokens.",
    "shrinkage": "Mean ||x_hat|| / ||x|| (1 = no shrinkage).",
    "ce_loss_recovered": "(CE with zero-ablation - CE with the SAE spliced in) / (CE zero-ablation - CE clean): "
                         "1 = the SAE loses nothing downstream.",
    "kl": "Steering side effect: KL(clean || steered) of the next-token distributions on the prompt (nats), mean "
          "over edited positions.",
    "kl_div": "KL divergence of the spliced model's next-token distribution from the clean one (nats/token).",
    "delta_lm_loss": "CE loss with the SAE spliced in minus the clean CE loss (nats/token).",
    "loss": "Training objective at the end of training.",
    "mmcs": "Mean max cosine similarity between learned and reference directions (Sharkey et al. 2022).",
    "ce_clean": "Next-token cross-entropy of the clean model (nats/token).",
    "ce_sae": "Next-token cross-entropy with the SAE reconstruction spliced in at the hook (nats/token).",
    "ce_zero_ablation": "Next-token cross-entropy with the hook's output zeroed (nats/token).",
    "alive_features": "Latents that fired at least once on the interpretation tokens.",
    # Dead/dense fractions of the other stages, each its own name: a different token set or window is a
    # different number (evaluate's dead_fraction is over the validation tokens it evaluates).
    "interpret_dead_fraction": "Fraction of latents that never fired on the interpret stage's tokens (all tokens of "
                               "interpret.split): 1 - alive_features / d_sae.",
    "dead_fraction_window": "Training, at its end: fraction of latents silent for the last train.dead_window_tokens "
                            "training tokens (the dead set AuxK and resampling use).",
    "dense_fraction_window": f"Training, at its end: fraction of latents firing on more than {DENSE_THRESHOLD:.0%} of "
                             "the tokens of the last complete train.dead_window_tokens window.",
    "fvu_batch": "Training, at its end: FVU of the last training batches, each centred on its own mean (running mean "
                 "since the previous log row).",
    "explained_variance": "1 - FVU.",
    "tokens_per_s": "Throughput in tokens per second.",
    "median_topic_auroc": "Median over features of the best topic AUROC.",
    "mean_explanation_score": "Mean detection score of the explanations on held-out examples.",
    "mean_fuzzing_balanced_accuracy": "Mean over explained features of fuzzing balanced accuracy: does the scorer tell "
                                      "a context's most active tokens highlighted from as many silent tokens of the same "
                                      "shown window highlighted (Paulo et al. 2024)?",
    "mean_fuzzing_balanced_accuracy@1": "Retired: wrong highlights drawn from the whole context, mostly outside the "
                                        "shown window (not comparable with @2).",
    "n_special_tokens": "Validation tokens left out of the metrics as BOS/EOS/PAD (evaluate.exclude_special_tokens).",
    # Steering (pipeline/steering/{metrics,verdict}.py).
    "hm": "Harmonic mean of concept@2 and fluency@2 of one generation (AxBench, Wu et al. 2025); per method: "
          "mean over test prompts and features at each feature's validation-chosen coefficient.",
    "concept": "Topic probability of the continuation under a naive-Bayes token model (labelled corpora), else "
               "min(1, re-encoded feature activation / m_f).",
    "fluency": "min(1, unsteered perplexity / steered perplexity) on the same prompt.",
    "scale": "m_f, the steered feature's scale: its max activation (or a quantile of its per-context maxima, "
             "steer.scale) on the statistics split.",
    "write_norm": "||m_f * W_dec[f]||: the size of every steering method's perturbation at coefficient 1.",
    "fire_rate": "Fraction of the statistics split's tokens on which the feature fires.",
    "concept_act": "Mean re-encoded activation of the steered feature over the continuation, divided by m_f.",
    "concept_frac": "Fraction of continuation tokens on which the steered feature fires.",
    "topic_score": "Probability of the feature's topic for the continuation under a naive-Bayes token model.",
    "perplexity": "Perplexity of the continuation under the unsteered model.",
    "distinct2": "Distinct bigrams / bigrams of the continuation (flags repetition).",
    "other_features": "Relative L1 change of all other SAE features at the hook on the prompt.",
    "ablation_effect": "Next-token loss change when the feature is ablated (SAE error kept), on contexts where it "
                       "fires minus on contexts where it does not (nats/token).",
    "unsteered_concept": "Test concept@2 of the unsteered continuations, mean over features.",
    "sae_hm@1": "Retired: test hm@1 of the SAE method with the best *test* hm@1 (chosen on the data it reports).",
    "sae_hm": "Test hm@2 of the SAE method (add or clamp) chosen on validation hm@2.",
    "sae_concept_gain": "Test concept@2 of the validation-chosen SAE method minus the unsteered continuation's.",
    "test_hm": "Per method: mean test hm@2 over (test prompt, feature) units with a 95% two-way bootstrap interval.",
    "validation_hm": "Per SAE method: mean validation hm@2 at each feature's chosen coefficient (chooses the SAE method).",
    # Likelihood steering evidence (pipeline/steering/{likelihood,decide}.py): every corpus label a concept.
    "lik_effect": "Change of log sum_{v in lexicon} p(v), the next-token probability mass of the concept's topic lexicon "
                  "(top-PMI tokens of the label on the train split), when steering; mean over the positions of a held-out "
                  "neutral text (nats). Compared across methods at a matched KL budget (interpolated along each method's "
                  "coefficient sweep).",
    "lik_kl": "KL(base || steered) of the next-token distribution on the held-out neutral text, mean over positions (nats).",
    "lik_dloss": "Change of the neutral text's own next-token loss when steering, at the KL budget (nats/token).",
    "anti_steered": "Fraction of (concept, held-out text) units whose lexicon log-mass fell under steering at the KL budget.",
    "abl_selectivity": "Ablation on held-out documents of the topic: mean drop of log p(actual next token) over positions "
                       "whose target is a lexicon token minus the mean drop over the other positions (nats).",
    "abl_dloss": "Ablation: mean change of the next-token loss over all positions of the topic's held-out documents (nats/token).",
}
# Steering values computed from the feature statistics (m_f, firing, the difference-in-means direction,
# the ablation contexts; pipeline/steering/stats.py) -- nearly all of them, since every method's
# perturbation is sized by m_f. The current versions leave the tokenizer's BOS/EOS/PAD positions out
# of those statistics, and ablation keeps those positions' activations, as evaluate does; the previous
# version counted them. Previous name -> current name.
STEERING_EXCLUDING_SPECIAL = {
    **{f"{m}@1": f"{m}@2" for m in (
        "hm", "concept", "fluency", "concept_act", "concept_frac", "topic_score", "perplexity", "distinct2", "kl",
        "other_features", "ablation_dloss_fire", "ablation_dloss_nofire", "ablation_effect", "scale",
        "write_norm", "fire_rate", "unsteered_concept")},
    "sae_hm@2": "sae_hm@3", "sae_concept_gain@2": "sae_concept_gain@3",
}
# Both token sets of each metric, spelled out: the all-token name and the special-tokens-excluded one.
_ALL_TOKENS = " Over all tokens, BOS/EOS/PAD included."
_NO_SPECIAL = " Over the tokens that are not BOS/EOS/PAD (evaluate.exclude_special_tokens)."
_SPLICE_ALL = " Every position spliced/zeroed and counted, BOS/EOS/PAD included."
_SPLICE_NO_SPECIAL = (" BOS/EOS/PAD positions keep their original activation in the spliced and zero-ablated "
                      "forwards, and predictions made there are not averaged.")
for _old, _new in [*EXCLUDING_SPECIAL.items(), ("nmse@1", "nmse@2")]:  # nmse: the former name, for older runs
    _base = _old.split("@")[0]
    _all, _excl = (_SPLICE_ALL, _SPLICE_NO_SPECIAL) if _old in _SPLICED else (_ALL_TOKENS, _NO_SPECIAL)
    DEFINITIONS[_old] = DEFINITIONS[_base] + _all
    DEFINITIONS[_new] = DEFINITIONS[_base] + _excl
# The previous version's text: its own names (concept@1, ...) and the statistics it used.
_STATS_ALL = (" Retired version: feature statistics (m_f, firing, the difference in means, the ablation contexts) "
              "over all tokens, BOS/EOS/PAD included (not comparable with the current version).")
_STATS_NO_SPECIAL = (" Feature statistics (m_f, firing, the difference in means, the ablation contexts) over the "
                     "tokens that are not BOS/EOS/PAD; ablation keeps those positions' activations.")
for _old, _new in STEERING_EXCLUDING_SPECIAL.items():
    _base = _old.split("@")[0]
    DEFINITIONS[_old] = DEFINITIONS.get(_base, "").replace("@2", "@1") + _STATS_ALL
    DEFINITIONS[_new] = DEFINITIONS.get(_base, "") + _STATS_NO_SPECIAL

# SAEBench-comparable evaluation (pipeline/saebench/, the bench stage). Sparse probing names are
# SAEBench's (sae_top_{k}_test_accuracy, ...) with a version; ``versioned`` adds it.
SPARSE_PROBING_VERSION = 1
ABSORPTION_LETTERS = "absorption_letters@1"
MEAN_ABSORPTION_FRACTION = "mean_absorption_fraction@1"
MEAN_FULL_ABSORPTION = "mean_full_absorption@1"
MEAN_SPLIT_FEATURES = "mean_num_split_features@1"


def versioned(probing_name: str) -> str:
    """``sae_top_1_test_accuracy`` -> ``sae_top_1_test_accuracy@1``."""
    return f"{probing_name}@{SPARSE_PROBING_VERSION}"


_PROBE = ("Sparse probing (SAEBench recipe) on the corpus's topic labels: one-vs-rest tasks, documents mean-pooled "
          "over non-special tokens, document-level train/validation/test split by seed; test accuracy, mean over labels. ")
for _src, _what in (("sae", "SAE latents"), ("llm", "raw activation channels (baseline)")):
    DEFINITIONS[f"{_src}_test_accuracy"] = _PROBE + f"Logistic regression on all {_what}, C chosen on validation."
    for _k in (1, 2, 5, 10, 20, 50, 100):
        DEFINITIONS[f"{_src}_top_{_k}_test_accuracy"] = (
            _PROBE + f"Logistic regression on the {_k} {_what} with the largest |mean(pos) - mean(neg)| on train.")
        DEFINITIONS[f"{_src}_l1_top_{_k}_test_accuracy"] = (
            _PROBE + f"Logistic regression on the first {_k} {_what} an L1-penalised probe admits on train.")
DEFINITIONS.update({
    "absorption_letters": "First letters whose ground-truth probe has test F1 > 0.6 (absorption needs 20, "
                          "bench.absorption_min_letters).",
    "mean_absorption_fraction": "Feature absorption (Chanin et al. 2024, SAEBench first-letter task): mean over present "
                                "letters of the share of the probe projection carried by absorbing latents instead of "
                                "the letter's main latents. Lower is better.",
    "mean_full_absorption": "Mean over present letters of the fraction of words where the main latents are silent and "
                            "one other latent carries >= 40% of the probe projection. Lower is better.",
    "mean_num_split_features": "Mean over present letters of the main latents per letter (feature splitting: k grows "
                               "while the k-sparse probe's F1 gains > 0.03).",
})
