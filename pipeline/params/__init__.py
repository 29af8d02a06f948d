"""The one params schema, mirroring ``params.yaml`` section by section.

Stages call :func:`load_params`; the library below never reads ``params.yaml`` itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.params.analysis import BenchParams, InterpretParams, LLMParams, SteerParams
from pipeline.params.core import ParamsError, describe, flatten, from_dict, knob, missing_keys, to_dict
from pipeline.params.data import CorpusParams, ExtractParams, ModelParams
from pipeline.params.numerics import NumericsParams, apply_portable
from pipeline.params.sae import EvaluateParams, SAEParams, TrainParams
from pipeline.params.tracking import ReportParams, TrackingParams

log = logging.getLogger(__name__)

__all__ = ["Params", "ParamsError", "load_params", "apply_overrides", "describe", "flatten", "to_dict"]


@dataclass
class Params:
    seed: int = knob(0, help="Global seed: shuffles, initialisation, sampling.", ge=0)
    model: ModelParams = knob(factory=ModelParams, help="Subject model.")
    corpus: CorpusParams = knob(factory=CorpusParams, help="Corpus and token contexts (prepare stage).")
    extract: ExtractParams = knob(factory=ExtractParams, help="Activation extraction.")
    sae: SAEParams = knob(factory=SAEParams, help="SAE architecture.")
    train: TrainParams = knob(factory=TrainParams, help="SAE training loop.")
    evaluate: EvaluateParams = knob(factory=EvaluateParams, help="SAE evaluation.")
    llm: LLMParams = knob(factory=LLMParams, help="OpenAI-compatible LLM endpoint of the openai: backends (interpret, steer).")
    interpret: InterpretParams = knob(factory=InterpretParams, help="Feature interpretation.")
    steer: SteerParams = knob(factory=SteerParams, help="Causal steering evaluation.")
    bench: BenchParams = knob(factory=BenchParams, help="SAEBench-comparable evaluation: sparse probing, absorption, result files.")
    tracking: TrackingParams = knob(factory=TrackingParams, help="MLflow tracking.")
    report: ReportParams = knob(factory=ReportParams, help="Report.")
    numerics: NumericsParams = knob(factory=NumericsParams, help="Numerics of the compute stages: the portable (cross-machine) path, threads.")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a nested dict, in place.

    A quoted value (``sae.recipe='"2023"'``) stays a string, as in YAML; an unquoted string that reads as
    a number (``1e-3``, which PyYAML leaves a string) becomes a float.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        text = raw.strip()
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if isinstance(value, str) and not quoted:
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ParamsError(f"--set {key}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override and validate params; raise :class:`ParamsError` on any user mistake.

    The file must list every key of the schema (``null`` counts as listed): DVC tracks only the
    keys ``params.yaml`` holds, so a key silently defaulted would change results without DVC
    seeing it. Bad values are reported first (they name the key precisely, e.g. a misspelt key),
    then missing keys, all in one line. ``overrides`` change values; they do not complete a file.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    if data is None or data == {}:
        sections = ", ".join(f.name for f in fields(Params))
        raise ParamsError(f"{path}: empty (expected every section: {sections}; see docs/params.md)")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    missing = missing_keys(Params, data)
    absent = (f"{path}: missing keys: {', '.join(missing)} (every key must be listed so DVC tracks it; "
              "see docs/params.md for each key's default)")
    try:
        apply_overrides(data, list(overrides))
        params = from_dict(Params, data)
    except ParamsError as e:  # a misspelt key is often also a missing one: name both, still in one line
        if missing:
            raise ParamsError(f"{e}; {absent}") from None
        raise
    for change in apply_portable(params):  # resolved once, here: every stage sees the portable dtypes
        log.info("numerics.portable: %s", change)
    if missing:
        raise ParamsError(absent)
    return params
