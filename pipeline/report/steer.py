"""The steering verdict in the report: per-method test means and SAE-minus-baseline differences with their
95% bootstrap intervals, as written to ``overall`` of ``results/steer.json`` (``pipeline.steering.verdict``)."""

from __future__ import annotations

import math
import re
from typing import Any

from pipeline.params.analysis import SAE_METHODS
from pipeline.report.document import Para, Table

__all__ = ["verdict_blocks", "likelihood_blocks"]

_DIFF = re.compile(r"^(judge_)?sae_minus_(\w+)_hm@\d+$")


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "—"


def _ci(d: dict[str, Any]) -> str:
    lo, hi = d.get("ci95_low"), d.get("ci95_high")
    return f"[{_num(lo)}, {_num(hi)}]" if lo is not None and hi is not None else "— (fewer than 2 test prompts)"


def verdict_blocks(overall: dict[str, Any]) -> list[Para | Table]:
    """The verdict sentence, a table of test means and one of paired differences (empty for an old file)."""
    out: list[Para | Table] = []
    if isinstance(overall.get("summary"), str):
        out.append(Para(overall["summary"]))
    means = []
    for metric, pre in (("hm@2", ""), ("judge_hm", "judge_")):
        test = overall.get(f"test_{metric}")
        if not isinstance(test, dict):
            continue
        sae = overall.get(f"{pre}sae_method")
        for m, d in test.items():
            if isinstance(d, dict):
                role = "SAE (chosen on validation)" if m == sae else "SAE" if m in SAE_METHODS else "baseline"
                means.append([metric, str(m), role, _num(d.get("mean")), _ci(d)])
    if means:
        out.append(Table(["metric", "method", "role", "test mean", "95% CI"], means))
    diffs = []
    for key, d in overall.items():
        hit = _DIFF.match(key)
        if hit and isinstance(d, dict):
            sae = overall.get(f"{hit.group(1) or ''}sae_method", "SAE")
            diffs.append(["judge_hm" if hit.group(1) else "hm@2", f"{sae} − {hit.group(2)}", _num(d.get("mean")),
                          _ci(d), str(d.get("verdict", "")), str(d.get("wins", ""))])
    if diffs:
        out.append(Table(["metric", "paired difference", "test mean", "95% CI", "verdict", "better on features"], diffs))
    bs = overall.get("bootstrap")
    if isinstance(bs, dict):
        out.append(Para(f"Intervals: {bs.get('scheme')}; {bs.get('resamples')} resamples, seed {bs.get('seed')}, "
                        f"{bs.get('test_prompts')} test prompts x {bs.get('features')} features. A verdict says "
                        "beats / loses to only when the difference's interval excludes 0.", note=True))
    return out


_ARM_LABEL = {"sae_input": "SAE latent, input-chosen", "sae_output": "SAE latent, output-chosen",
              "dim": "difference in means", "random_latent": "random latent (frequency-matched)",
              "random_direction": "random direction"}


def _est(d: Any) -> str:
    """'mean [low, high]' of an estimate dict."""
    return f"{_num(d.get('mean'))} {_ci(d)}" if isinstance(d, dict) else "—"


def likelihood_blocks(lik: Any) -> list[Para | Table]:
    """The likelihood evidence (``likelihood`` of ``metrics/steer.json``, :mod:`pipeline.steering.decide`): the
    verdict sentence, the Holm-corrected comparisons, each method at the verdict's KL budget, and per concept."""
    if not isinstance(lik, dict):
        return []
    out: list[Para | Table] = []
    if isinstance(lik.get("verdict_text"), str):
        out.append(Para(lik["verdict_text"]))
    comps = lik.get("comparisons")
    if isinstance(comps, dict) and comps:
        out.append(Table(["comparison", "metric", "difference", "95% CI", "Holm p", "verdict"],
                         [[k.replace("_vs_", " − "), str(d.get("metric", "")), _num(d.get("mean")), _ci(d),
                           _num(d.get("p_holm")), str(d.get("verdict", ""))] for k, d in comps.items() if isinstance(d, dict)]))
    methods = lik.get("methods")
    if isinstance(methods, dict) and methods:
        out.append(Table([f"method (at KL {lik.get('verdict_kl')} nats)", "lik_effect@1 (nats)", "95% CI", "anti-steered",
                          "lik_dloss@1", "concepts reaching the budget"],
                         [[_ARM_LABEL.get(m, m), _num(d.get("lik_effect@1", {}).get("mean")), _ci(d.get("lik_effect@1", {})),
                           _num(d.get("anti_steered@1")), _num(d.get("lik_dloss@1")), str(d.get("concepts_reaching_budget", ""))]
                          for m, d in methods.items() if isinstance(d, dict)]))
    concepts = lik.get("concepts")
    if isinstance(concepts, dict) and concepts:
        rows = []
        for name, c in concepts.items():
            if not isinstance(c, dict):
                continue
            lat, st, diff = c.get("latents", {}), c.get("steering", {}), c.get("differences", {})
            rows.append([name, f"{lat.get('sae_input')} / {lat.get('sae_output')} / {lat.get('random_latent')}",
                         _est(st.get("sae_input")), _est(st.get("random_latent")), _est(st.get("dim")),
                         _est(diff.get("sae_input_vs_random_latent")), _est(diff.get("sae_input_vs_dim")),
                         _est(c.get("ablate_zero_sae_input_vs_random_latent")), str(c.get("lexicon_text", ""))])
        out.append(Table(["concept", "latents (input / output / random)", "SAE-in effect", "random latent", "dim",
                          "SAE-in − random latent", "SAE-in − dim", "zero-ablation selectivity: SAE-in − random latent",
                          "lexicon (first tokens)"], rows))
    bs = lik.get("bootstrap")
    if isinstance(bs, dict):
        out.append(Para(f"Likelihood intervals: {bs.get('scheme')}; {bs.get('resamples')} resamples, seed {bs.get('seed')}; "
                        f"{lik.get('n_concepts')} concepts x {lik.get('n_test_texts')} test texts (steering), up to "
                        f"{lik.get('n_ablation_windows')} windows per concept (ablation). Per-concept intervals resample "
                        "that concept's units only. A verdict says beats / loses to only when the Holm-adjusted p < "
                        f"{bs.get('alpha')}.", note=True))
    return out
