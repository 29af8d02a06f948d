"""Metric and param names as MLflow accepts them.

Our metric files name every value with its definition version, ``fvu@2`` (:mod:`pipeline.metric_names`), but MLflow
only allows alphanumerics, ``_ - . / :`` and spaces in metric/param names (``:`` not on Windows;
``mlflow.utils.validation.validate_param_and_metric_name``). The mapping, applied to every path
component, is:

* ``name@V`` → ``name_vV``  (``fvu@2`` → ``fvu_v2``), so the version stays part of the name;
* any other disallowed character (including ``:``, for portability) → ``_``;
* components are joined with ``/`` (MLflow's UI groups charts by the part before the first ``/``),
  e.g. ``metrics/evaluate.json {"layers.9.resid_post": {"fvu@2": 0.1}}`` →
  ``evaluate/layers.9.resid_post/fvu_v2``.

:func:`metric_base` recovers ``(name, version)`` from either spelling, which is how the report and
the frontier find ``l0``/``fvu`` whatever version the evaluate stage wrote.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

_BAD = re.compile(r"[^A-Za-z0-9_.\- /]")
_VERSIONED = re.compile(r"^(?P<base>.+?)(?:@|_v)(?P<version>\d+)$")

# MLflow 3 limits (mlflow.utils.validation): longer values are rejected, so we truncate.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000


def sanitize_component(name: str) -> str:
    """One path component of a metric name → MLflow-safe (``fvu@2`` → ``fvu_v2``)."""
    name = re.sub(r"@(\d+)$", r"_v\1", str(name))
    name = name.replace("@", "_v").replace("/", "_")
    name = _BAD.sub("_", name).strip()
    # "." and ".." would make MLflow reject the key as a path that resolves elsewhere.
    return name if name not in ("", ".", "..") else "_"


def metric_key(*components: str) -> str:
    """Join sanitised components with ``/``: ``metric_key("evaluate", "fvu@2") == "evaluate/fvu_v2"``."""
    return "/".join(sanitize_component(c) for c in components)[:MAX_KEY]


def metric_base(name: str) -> tuple[str, int | None]:
    """``"fvu@2"`` or ``"fvu_v2"`` → ``("fvu", 2)``; unversioned ``"loss"`` → ``("loss", None)``."""
    m = _VERSIONED.match(name)
    if m:
        return m.group("base"), int(m.group("version"))
    return name, None


def iter_numeric(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    """Leaves of a nested JSON object that are numbers (bools become 0/1; strings and lists are skipped)."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from iter_numeric(v, (*path, str(k)))
    elif isinstance(tree, bool):
        yield path, float(tree)
    elif isinstance(tree, (int, float)):
        yield path, float(tree)


def param_value(value: Any) -> str:
    """A params.yaml value as an MLflow param string: strings verbatim, the rest as JSON (null, true, [..])."""
    import json

    if isinstance(value, str):
        text = value
    elif isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    else:
        text = json.dumps(value)
    return text[:MAX_PARAM_VALUE]
