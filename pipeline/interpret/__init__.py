"""Feature interpretation: streaming statistics, examples, logit lens, topic alignment, dashboard.

Entry point: :func:`interpret_hook` (one SAE on one activation dataset). Modules: ``contexts``
(token-context lookups), ``stream`` (the single statistics pass) folding into ``aggregates``
(per-feature running state), ``bins`` (log bins, topic AUROC), ``examples`` (which contexts each
feature is shown on), ``lens`` (logit lens, neighbours), ``tables`` (Parquet writers, metrics),
``outputs`` (each feature's table columns and dashboard entry), ``dashboard`` (static HTML); ``run``
puts them together.
"""

from __future__ import annotations

from pipeline.interpret.contexts import ContextTable, build_context_table
from pipeline.interpret.run import interpret_hook

__all__ = ["ContextTable", "build_context_table", "interpret_hook"]
