"""Compare a commit's recorded metrics with a rerun's (``sae verify``): bit-exact where the environment
matches, within a stated tolerance per metric where it does not.

Each ``results/<stage>.json`` (a stage's full results) carries the ``environment`` its numbers were computed in
(:mod:`pipeline.environment`). A stage is held to **bit-exact** equality when its recorded
environment equals the rerun's and so do those of every stage before it in the pipeline (their
outputs are its inputs). Otherwise each metric is held to the first rule of :data:`TOLERANCES` whose
pattern matches its name (``stage/path/name``, e.g. ``train/layers.9.resid_post/fvu_batch@1``), and the
environment keys that differ are named as causes (:func:`causes`: a resolved dtype, the world size, ...).

A node of the form ``{"mean", "ci95_low", "ci95_high"}`` (the steering verdict's bootstrap
intervals) is compared as one row: within tolerance when the rerun's mean lies inside the recorded
95% interval, i.e. the difference is within the sampling noise the pipeline itself reports.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.environment import KEY as ENVIRONMENT_KEY

__all__ = ["Tolerance", "TOLERANCES", "Row", "Verification", "compare", "format_report", "format_tolerances"]

STAGE_ORDER = ("prepare", "extract", "train", "evaluate", "interpret", "steer")  # dvc.yaml's order
PORTABLE_IGNORES = ("cpu", "cpu_flags")  # see comparable()
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "—"})()
Kind = Literal["exact", "close", "interval", "verdict", "unchecked"]
Status = Literal["identical", "within", "out", "unchecked"]


@dataclass(frozen=True)
class Tolerance:
    """``kind`` exact: must be equal; close: ``|now - recorded| <= abs + rel * |recorded|``; interval: the
    rerun's mean inside the recorded 95% interval; verdict: no reversal (beats <-> loses to); unchecked:
    shown, not held to anything across environments (``why`` says what checks it instead)."""

    pattern: str
    kind: Kind
    why: str
    rel: float = 0.0
    abs: float = 0.0

    def describe(self) -> str:
        if self.kind == "close":
            parts = ([f"rel {self.rel:g}"] if self.rel else []) + ([f"abs {self.abs:g}"] if self.abs else [])
            return " + ".join(parts) or "exact"
        return {"interval": "in recorded 95% CI", "verdict": "no reversal"}.get(self.kind, self.kind)


SAME_ENVIRONMENT = Tolerance("", "exact", "the environment matches: same inputs, same kernels, same bits")
INTERVAL = Tolerance("", "interval", "a bootstrap mean: a move inside the recorded 95% interval is within the noise "
                     "the verdict already accounts for")
# Measured, not assumed: a retrained SAE in the other dtype steers with other latents, and its means left the
# recorded intervals (calibration below); a reversed verdict would need about 3x the largest move seen there.
DTYPE_INTERVAL = Tolerance("", "unchecked", "a bootstrap mean of steering with an SAE trained in another dtype: "
                           "default pipeline, bf16 vs fp32: test_hm@1/add 0.149 -> 0.203, outside its recorded "
                           "95% CI [0.103, 0.187] (up to 2.9 half-widths); the verdicts' reversals are checked")
# Across environments (another CPU, GPU, resolved dtype, world size, thread count). First match wins.
# Calibrated on the default pipeline run with train.dtype and interpret.encode_dtype bf16 (auto on an AMX
# CPU) and float32 (auto on a CPU without bf16), in
# benchmarks/results/cpu-xeon-amx-2core-2026-12-05-verify-calibration.json: every numeric rule leaves >= 2x
# room over the difference seen there (tests/test_verify_causes.py). Small pipelines move more: the tests' tiny one, with a few spliced
# contexts, moved ce_loss_recovered@1 1.1154 -> 1.3623 between the two dtypes.
TOLERANCES: tuple[Tolerance, ...] = (
    Tolerance(r"^prepare/", "exact", "tokenisation is integer work: any machine gives the same contexts"),
    Tolerance(r"^extract/tokens/", "exact", "token counts, fixed by params and data"),
    Tolerance(r"/(steps|tokens|d_sae|n_tokens|val_n_tokens|n_special_tokens|n_splice_contexts|interpret_tokens|"
              r"explainer)$", "exact", "counts and settings fixed by params and data sizes, not by rounding"),
    Tolerance(r"^extract/hooks/.*/mean_norm$", "close", "mean norm of fp16-stored activations: the forward's "
              "rounding (bf16: 2^-8 per element) averages out over tokens", rel=1e-2),
    Tolerance(r"(dead|dense)_fraction(_window)?(@\d+)?$|frac_topic_auroc_ge_0\.9@\d+$", "close",
              "a fraction of latents: a latent at the firing threshold or window edge flips", abs=0.05),
    Tolerance(r"^evaluate/.*/ce_clean@\d+$", "close", "the model alone, no SAE: only the forward's rounding",
              rel=1e-3),
    Tolerance(r"/(ce_loss_recovered|delta_lm_loss)@\d+$", "close", "a ratio / difference of nearly equal losses "
              "on a few spliced contexts amplifies the retrained SAE's changes (default pipeline, bf16 vs fp32 "
              "training: delta_lm_loss@2 0.424 -> 0.408)", rel=0.05, abs=0.05),
    Tolerance(r"/kl_div@\d+$", "close", "a small KL between nearly equal distributions: relative changes are large",
              rel=0.25, abs=1e-3),
    Tolerance(r"^interpret/.*/(alive_features@\d+|explained_features)$", "close", "latents that fired (the stats "
              "explainer explains each): see the fractions", rel=0.05),
    Tolerance(r"^interpret/", "close", "scores in [0, 1] averaged over features of a retrained SAE", abs=0.05),
    Tolerance(r"^steer/topic_model_accuracy@\d+$", "close", "naive-Bayes counts in float64 NumPy, no model forward",
              abs=1e-9),
    Tolerance(r"^steer/overall/.*verdict$", "verdict", "'beats' <-> 'loses to' contradicts the record; "
              "'indistinguishable' next to either is the intervals' overlap, not a contradiction"),
    Tolerance(r"^steer/", "unchecked", "per-feature / per-method values of greedy generations: one rounding "
              "difference can change a token and the whole continuation; checked through the intervals and "
              "verdicts of steer/overall"),
    Tolerance(r"^(train|evaluate)/", "close", "the SAE is retrained: the optimisation amplifies a rounding "
              "difference (bf16 autocast vs fp32, another kernel)", rel=0.05),
    Tolerance(r"", "close", "no specific rule", rel=0.05),
)


@dataclass
class Row:
    metric: str
    recorded: Any
    now: Any
    status: Status
    rule: Tolerance


@dataclass
class Verification:
    rows: list[Row] = field(default_factory=list)
    # (stage, key, recorded, now) for every environment value that differs
    environment: list[tuple[str, str, str, str]] = field(default_factory=list)
    exact_stages: list[str] = field(default_factory=list)

    @property
    def causes(self) -> list[str]:
        """The environment differences named as causes, e.g. "world size differs (2 vs 1)"; see :func:`causes`."""
        return causes(self.environment)

    @property
    def ok(self) -> bool:
        return all(r.status != "out" for r in self.rows)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)


def _cause(key: str, recorded: str, now: str) -> tuple[int, str]:
    """(rank, text) of one differing environment key: a resolved dtype first (the largest legitimate cause)."""
    rec, cur = ("not recorded" if v == repr(MISSING) else v for v in (recorded, now))
    if key == "environment":
        return 3, f"environment {recorded} vs {now}"
    if key.endswith("dtype"):
        return 0, f"resolved dtype differs: {key} ({rec} vs {cur})"
    if key == "train.world_size":
        return 1, f"world size differs ({rec} vs {cur})"
    if key in ("cpu", "cpu_flags"):
        return 2, "CPU differs"
    if key == "threads":
        return 2, f"thread count differs ({rec} vs {cur})"
    if key == "python" or key.startswith("versions."):
        return 2, f"library versions differ: {key.removeprefix('versions.')} ({rec} vs {cur})"
    return 2, f"{key} differs ({rec} vs {cur})"


def causes(environment: list[tuple[str, str, str, str]]) -> list[str]:
    """Each cause once, in rank order, from ``Verification.environment`` (keys the portable path ignores left out)."""
    named = sorted({_cause(k, a, b) for _, k, a, b in environment if not k.endswith("(portable: ignored)")})
    return list(dict.fromkeys(text for _, text in named))


def comparable(env: Mapping[str, str]) -> dict[str, str]:
    """The environment keys that decide bit-exactness. Under the portable path (MKL's vendor-neutral
    branch, ATen's baseline kernels) the CPU model and flags no longer choose a kernel, so they are left
    out: a portable rerun on another x86 CPU is held to bit-exact equality, which is what it promises."""
    portable = (env.get("numerics.portable") == "true" and env.get("cpu_capability") == "DEFAULT"
                and env.get("mkl_cbwr") in ("COMPATIBLE,STRICT", "none"))
    return {k: v for k, v in env.items() if not (portable and k in PORTABLE_IGNORES)}


def _is_interval(node: Mapping[str, Any]) -> bool:
    return {"mean", "ci95_low", "ci95_high"} <= node.keys()


def leaves(tree: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(stage/path/name, value)`` for every value of a metrics JSON; interval nodes as one value (the dict
    of its bounds), the environment block left out."""
    if isinstance(tree, Mapping) and not (path.count("/") and _is_interval(tree)):
        for key, value in tree.items():
            if key != ENVIRONMENT_KEY or path.count("/"):
                yield from leaves(value, f"{path}/{key}")
        return
    if isinstance(tree, Mapping):  # an interval node: its bounds as one value, anything else beside it
        yield path, {k: tree[k] for k in ("mean", "ci95_low", "ci95_high")}
        for key, value in tree.items():
            if key not in ("mean", "ci95_low", "ci95_high"):
                yield from leaves(value, f"{path}/{key}")
        return
    yield path, tree


def rule_for(name: str, value: Any, dtype_differs: bool = False) -> Tolerance:
    """The rule for metric ``name``; ``dtype_differs``: a resolved dtype differs in its stage or one before it."""
    if isinstance(value, Mapping):
        return DTYPE_INTERVAL if dtype_differs else INTERVAL
    return next(t for t in TOLERANCES if re.search(t.pattern, name))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def within(rule: Tolerance, recorded: Any, now: Any) -> bool:
    """Whether ``now`` is within ``rule`` of ``recorded`` (both present and not identical)."""
    if rule.kind == "close" and _number(recorded) and _number(now):
        return abs(now - recorded) <= rule.abs + rule.rel * abs(recorded)
    if rule.kind == "interval" and isinstance(now, Mapping) and _number(now.get("mean")):
        lo, hi = recorded.get("ci95_low"), recorded.get("ci95_high")
        return _number(lo) and _number(hi) and lo <= now["mean"] <= hi
    if rule.kind == "verdict" and isinstance(recorded, str) and isinstance(now, str):
        return {recorded, now} != {"beats", "loses to"}
    return False


def compare(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> Verification:
    """``recorded`` and ``now``: ``{stage: parsed results/<stage>.json}``. Stages in pipeline order."""
    stages = sorted(set(recorded) | set(now), key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else 99, s))
    out = Verification()
    exact = True  # every stage so far ran in the recorded environment
    dtype_differs = False  # a resolved dtype differed in some stage so far
    for stage in stages:
        rec_json, now_json = recorded.get(stage, {}), now.get(stage, {})
        rec_env, now_env = rec_json.get(ENVIRONMENT_KEY), now_json.get(ENVIRONMENT_KEY)
        if rec_env is None or now_env is None:
            out.environment.append((stage, "environment", "recorded" if rec_env else "not recorded",
                                    "recorded" if now_env else "not recorded"))
        else:
            same = comparable(rec_env) == comparable(now_env)
            out.environment += [(stage, k + (" (portable: ignored)" if same else ""), str(rec_env.get(k, MISSING)),
                                 str(now_env.get(k, MISSING)))
                                for k in sorted(set(rec_env) | set(now_env)) if rec_env.get(k) != now_env.get(k)]
        exact = exact and rec_env is not None and now_env is not None and comparable(rec_env) == comparable(now_env)
        dtype_differs = dtype_differs or any(k.endswith("dtype") and (rec_env or {}).get(k) != (now_env or {}).get(k)
                                             for k in set(rec_env or {}) | set(now_env or {}))
        if exact:
            out.exact_stages.append(stage)
        rec_leaves, now_leaves = dict(leaves(rec_json, stage)), dict(leaves(now_json, stage))
        for name in list(rec_leaves) + [n for n in now_leaves if n not in rec_leaves]:
            a, b = rec_leaves.get(name, MISSING), now_leaves.get(name, MISSING)
            rule = SAME_ENVIRONMENT if exact else rule_for(name, a if a is not MISSING else b, dtype_differs)
            status: Status
            if a is not MISSING and b is not MISSING and json.dumps(a) == json.dumps(b):
                status = "identical"
            elif rule.kind == "unchecked":
                status = "unchecked"
            elif a is not MISSING and b is not MISSING and within(rule, a, b):
                status = "within"
            else:
                status = "out"
            out.rows.append(Row(name, a, b, status, rule))
    return out


def _show(v: Any, width: int = 28) -> str:
    if isinstance(v, Mapping) and "mean" in v:
        s = f"{v['mean']!r} [{v['ci95_low']:.4g}, {v['ci95_high']:.4g}]" if _number(v.get("ci95_low")) else repr(v)
    elif isinstance(v, str):
        s = v
    else:
        s = repr(v) if v is MISSING or isinstance(v, float) else json.dumps(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_report(v: Verification, show_all: bool = False) -> str:
    """The environment differences, then metric | recorded | now | within tolerance (rows that moved, or all)."""
    lines: list[str] = []
    if not v.environment:
        lines += ["Environment: the recorded one in every stage: every metric must be bit-exact.", ""]
    else:
        only_cpu = all(k.endswith("(portable: ignored)") for _, k, _, _ in v.environment)
        lines += [("Environment: the recorded one up to the CPU, which the portable path makes irrelevant: every "
                   "metric must be bit-exact." if only_cpu else
                   "Environment differences (the stages from the first one on are held to tolerances):"),
                  *_table(["stage", "key", "recorded", "now"], [[s, k, _show(a, 40), _show(b, 40)]
                                                                 for s, k, a, b in v.environment]), ""]
        if v.causes:
            lines += [f"Cause: {'; '.join(v.causes)}.", ""]
    verdict = {"identical": "yes (identical)", "within": "yes ({})", "out": "NO ({})", "unchecked": "not checked"}
    shown = [r for r in v.rows if show_all or r.status != "identical"]
    if shown:
        lines += _table(["metric", "recorded", "now", "within tolerance"],
                        [[r.metric, _show(r.recorded), _show(r.now), verdict[r.status].format(r.rule.describe())]
                         for r in shown])
        lines.append("")
    lines.append(f"{len(v.rows)} metrics: {v.count('identical')} identical, {v.count('within')} moved within "
                 f"tolerance, {v.count('unchecked')} moved and not checked across environments, "
                 f"{v.count('out')} out of tolerance. Bit-exact stages: {', '.join(v.exact_stages) or 'none'}.")
    return "\n".join(lines)


def format_tolerances() -> str:
    """The tolerance table (``sae verify --tolerances``, README)."""
    rows = [[t.pattern or "(anything else)", t.describe(), t.why]
            for t in (SAME_ENVIRONMENT, INTERVAL, DTYPE_INTERVAL, *TOLERANCES)]
    rows[0][0], rows[1][0], rows[2][0] = "(same environment)", "(mean with 95% CI)", "(the same, a dtype differs)"
    return "\n".join(_table(["metric (regex)", "tolerance", "why"], rows))
