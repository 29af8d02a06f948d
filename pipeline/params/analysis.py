"""Params of the analysis stages: interpretation and steering. (Owned by the interpret/steer work.)"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.params.core import knob


@dataclass
class InterpretParams:
    explainer: str = knob("stats", help="Explainer backend: 'stats', 'local:<model>' or 'openai:<model>'.")
    n_examples: int = knob(20, help="Top-activating examples kept per feature.", ge=1)


@dataclass
class SteerParams:
    features: list[int] = knob(factory=list, help="Features to steer (empty: choose automatically).")
    coefficients: list[float] = knob(factory=lambda: [0.0, 2.0, 4.0, 8.0], help="Coefficient sweep.")
