"""The report's last sections: what was configured (only the knobs that apply to the architecture trained)
and where it ran (the environment blocks of the metrics files, the run's provenance)."""

from __future__ import annotations

from typing import Any

from pipeline.report.document import Bullets, Document, Heading, Para, Table
from pipeline.report.inputs import ReportInputs

__all__ = ["ARCH_KNOBS", "applies", "environment_section", "setup_section"]

_TOPK = frozenset({"topk", "batchtopk", "matryoshka_batchtopk"})
# SAE config fields that only some architectures read (pipeline/params/sae.py and pipeline/sae/config.py say
# which); every other field applies to all. An architecture this table does not know shows every field.
ARCH_KNOBS: dict[str, frozenset[str]] = {
    "k": _TOPK, "aux_coeff": _TOPK, "k_aux": _TOPK,
    "threshold_decay": frozenset({"batchtopk", "matryoshka_batchtopk"}),
    "matryoshka_fractions": frozenset({"matryoshka_batchtopk"}),
    "matryoshka_weighting": frozenset({"matryoshka_batchtopk"}),
    "matryoshka_auxk": frozenset({"matryoshka_batchtopk"}),
    "recipe": frozenset({"relu_l1"}), "resample_every": frozenset({"relu_l1"}),
    "max_resamples": frozenset({"relu_l1"}), "init_decoder_norm": frozenset({"relu_l1"}),
    "l1_coeff": frozenset({"relu_l1", "gated"}), "l1_warmup_steps": frozenset({"relu_l1", "gated", "jumprelu"}),
    "l0_coeff": frozenset({"jumprelu"}), "jumprelu_bandwidth": frozenset({"jumprelu"}),
    "jumprelu_init_threshold": frozenset({"jumprelu"}),
    "target_rate": frozenset({"kl"}), "kl_coeff": frozenset({"kl"}),
    "hidden_sizes": frozenset({"dense"}),
}
_KNOWN = frozenset().union(*ARCH_KNOBS.values()) | {"relu_l1", "gated", "jumprelu", "kl", "dense"}


def applies(field: str, arch: str) -> bool:
    """Whether SAE config ``field`` means anything for architecture ``arch``."""
    return field not in ARCH_KNOBS or arch in ARCH_KNOBS[field] or arch not in _KNOWN


def _fmt(v: Any) -> str:
    from pipeline.report.sections import fmt  # one number format for the whole report

    return ", ".join(fmt(x) for x in v) if isinstance(v, list) else fmt(v)


def setup_section(doc: Document, inp: ReportInputs) -> None:
    p, m = inp.params, inp.manifest
    # A packaged or local model has no hub revision (the manifest records None): the configured one and the
    # weights hash identify it then.
    revision = m.get("revision") or p.get("model.revision", "?")
    rows = [
        ["model", str(m.get("model_id", p.get("model.name", "?")))],
        ["model revision", str(revision)],
        ["weights hash", str(m["weights_hash"])[:16] if m.get("weights_hash") else "not recorded (extract not run)"],
        ["compute dtype", str(p.get("model.dtype", "?"))],
        ["corpus", str(m.get("corpus", p.get("corpus.source", "?")))],
        ["context length", _fmt(p.get("corpus.context_length", "?"))],
        ["token budget", _fmt(p.get("corpus.n_tokens", "?"))],
        ["hooks", ", ".join(inp.hooks)],
    ]
    if "n_tokens" in m:
        rows.append(["tokens extracted (train split, first hook)", _fmt(m["n_tokens"])])
    doc.add(Heading(1, "Configuration"), Heading(2, "Model, corpus and hook"), Table(["", "value"], rows))
    doc.add(Heading(2, "SAE"))
    for hook in inp.hooks:
        cfg = inp.sae_cfgs.get(hook)
        if cfg is None:
            arch = str(p.get("sae.arch", ""))
            keys = sorted(k for k in p if k.startswith("sae.") and applies(k[4:], arch))
            doc.add(Para(f"{hook}: no trained SAE found (train not run); configured: "
                         + ", ".join(f"{k[4:]}={_fmt(p[k])}" for k in keys), note=True))
            continue
        arch = str(cfg.get("architecture", cfg.get("arch", "")))
        flat = [[k, _fmt(v)] for k, v in sorted(cfg.items()) if not isinstance(v, dict) and applies(k, arch)]
        hidden = sorted(k for k, v in cfg.items() if not isinstance(v, dict) and not applies(k, arch))
        doc.add(Para(f"{hook} (models/sae/{hook}/cfg.json):"), Table(["field", "value"], flat))
        if hidden:
            doc.add(Para(f"Not used by {arch}, so not shown: {', '.join(hidden)}.", note=True))
        training = cfg.get("training")
        imported = training.get("imported") if isinstance(training, dict) else None
        if isinstance(imported, dict):  # sae.source: a published SAE, imported by the train stage
            rows = [[k, _fmt(v) if not isinstance(v, dict) else ", ".join(f"{a}: {b}" for a, b in v.items())]
                    for k, v in sorted(imported.items()) if k != "notes"]
            doc.add(Para(f"Not trained here: imported from {imported.get('source')} "
                         f"(models/sae/{hook}/provenance.json):"), Table(["field", "value"], rows))
        elif isinstance(training, dict):
            doc.add(Para("Training loop (train params the SAE was trained with):"),
                    Table(["field", "value"], [[k, _fmt(v)] for k, v in sorted(training.items())
                                               if not isinstance(v, dict)]))


def environment_section(doc: Document, inp: ReportInputs) -> None:
    r = inp.run
    items = [f"Run: {r.get('run_name', '?')}"]
    if r.get("commit"):
        items.append(f"Git commit: {r['commit'][:12]}" + (" (uncommitted changes)" if r.get("dirty") == "true" else ""))
    if r.get("exp_name"):
        items.append(f"DVC experiment: {r['exp_name']} (baseline {r.get('baseline_rev', '')[:12]})")
    if inp.tracking_note:
        items.append(inp.tracking_note)
    doc.add(Heading(1, "Run and environment"), Bullets(items))
    if inp.environment:
        doc.add(Para("From the environment block of each results/<stage>.json (env.<stage>.<key> where stages differ).",
                     note=True),
                Table(["", "value"], [[k.removeprefix("env."), str(v)] for k, v in sorted(inp.environment.items())]))
