"""Causal steering evaluation: do SAE features drive the model's behaviour, and better than baselines?

Modules: ``interventions`` (addition, clamping, ablation as forward hooks), ``generate`` (batched
KV-cache generation, teacher-forced scoring), ``stats`` (feature statistics from activations),
``baselines`` (feature choice, difference-in-means and random directions), ``metrics`` (versioned
definitions), ``protocol`` (the sweep), ``judge`` (optional LLM judge, AxBench), ``summary``
(coefficient choice), ``verdict`` (SAE method chosen on validation, verdict against baselines),
``bootstrap`` (two-way bootstrap intervals), ``plots``, ``evaluate`` (everything in one call).
"""

from pipeline.steering.evaluate import SteeringResult, evaluate_steering
from pipeline.steering.interventions import RowSteering, clamp_feature, feature_write, steer

__all__ = ["SteeringResult", "evaluate_steering", "RowSteering", "clamp_feature", "feature_write", "steer"]
