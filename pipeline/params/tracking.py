"""Params of experiment tracking and the report. (Owned by the tracking/report work.)"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.params.core import knob


@dataclass
class TrackingParams:
    uri: str | None = knob(None, help="MLflow tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repository root).")
    experiment: str = knob("sae-pipeline", help="MLflow experiment name.")


@dataclass
class ReportParams:
    top_features: int = knob(20, help="Features listed in the report.", ge=0)
