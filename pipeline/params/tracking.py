"""Params of experiment tracking and the report. (Owned by the tracking/report work.)"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.params.core import knob


@dataclass
class TrackingParams:
    enabled: bool = knob(True, help="Log one MLflow run per pipeline execution (from the report stage).")
    uri: str | None = knob(
        None,
        help="MLflow tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repository "
        "root, i.e. $DVC_ROOT under DVC). Relative sqlite paths resolve against the repository root.",
    )
    experiment: str = knob("sae-pipeline", help="MLflow experiment name.")
    timeout_s: float = knob(
        3.0, help="Seconds to wait for a tracking server's /health before saving the run as pending (sae sync).", gt=0
    )


@dataclass
class ReportParams:
    top_features: int = knob(20, help="Features listed in the report.", ge=0)
    frontier: bool = knob(True, help="Draw the L0-FVU frontier across the experiment's MLflow runs.")
    max_runs: int = knob(500, help="At most this many earlier runs read for the frontier.", ge=1)
