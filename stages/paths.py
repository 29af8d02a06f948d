"""The data locations, re-exported from their home in the library, :mod:`pipeline.paths`.

Kept so that ``from stages.paths import X`` keeps working; new code imports ``pipeline.paths``.
"""

from pipeline.paths import (
    ACTIVATIONS,
    CONTEXTS,
    DASHBOARD,
    INTERPRET,
    METRICS,
    MODELS,
    PLOTS,
    STEER_FIGURES,
    TOKENS,
    TRAIN_CURVES,
)

__all__ = ["ACTIVATIONS", "CONTEXTS", "DASHBOARD", "INTERPRET", "METRICS", "MODELS", "PLOTS", "STEER_FIGURES",
           "TOKENS", "TRAIN_CURVES"]
