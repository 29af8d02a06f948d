"""Schema machinery: dataclasses with documented fields, validated from plain YAML dicts.

Every section of ``params.yaml`` is a dataclass. A field's docstring-like ``help`` and its
range live in ``field(metadata=...)`` built by :func:`knob`. Validation walks the dataclass
type hints, so one definition gives defaults, documentation, type checks and range checks.
Errors are :class:`ParamsError` with one line naming the dotted key, the bad value and what
is allowed; the CLI turns them into a non-zero exit without a traceback.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pipeline.errors import UserError

T = TypeVar("T")
_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ParamsError(UserError, ValueError):
    """A user mistake in params: always one line, always names the culprit."""


def knob(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Any = None,
) -> Any:
    """A documented dataclass field with an optional numeric range."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        # An unquoted 2023 is a number to YAML and to --set; the allowed value is the string.
        hint = "; quote it to mean the string" if not isinstance(value, str) and str(value) in get_args(tp) else ""
        raise ParamsError(f"{key}: {value!r} is not allowed (allowed: {_type_name(tp)}){hint}")
    if origin in (Union, types.UnionType):
        for alt in get_args(tp):
            try:
                return _coerce(value, alt, key)
            except ParamsError:
                continue
        raise ParamsError(f"{key}: {value!r} has the wrong type (expected {_type_name(tp)})")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{key}: expected null, got {value!r}")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            raise ParamsError(f"{key}: {value!r} has the wrong type (expected {_type_name(tp)})")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key}: {value!r} has the wrong type (expected a mapping)")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-3" as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ParamsError(f"{key}: {value!r} has the wrong type (expected {_type_name(tp)})")


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        if isinstance(value, list):
            for i, v in enumerate(value):
                _check_range(v, meta, f"{key}[{i}]")
        return
    checks = {"ge": (">=", lambda b: value >= b), "gt": (">", lambda b: value > b),
              "le": ("<=", lambda b: value <= b), "lt": ("<", lambda b: value < b)}
    for name, (sym, ok) in checks.items():
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise ParamsError(f"{key}: {value!r} is out of range (must be {sym} {bound})")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            allowed = ", ".join(sorted(fields))
            raise ParamsError(f"{where}: unknown key (allowed here: {allowed})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _coerce(data[name], hints[name], key)
            _check_range(value, f.metadata, key)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = from_dict(hints[name], {}, prefix=key)
            else:
                raise ParamsError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(prefix)  # cross-field rules live on the section, next to the fields they relate
    return obj


def missing_keys(cls: type, data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of schema ``cls`` absent from ``data``, in schema order; a wholly absent section
    is named once (``"train (whole section)"``). A key present with value ``null`` is present.
    A non-mapping where a section belongs is left to :func:`from_dict`, which names it.

    :func:`from_dict` fills absent keys with defaults (convenient in code); a params *file* must not
    rely on that, since DVC only tracks the keys the file lists.
    """
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            out.append(f"{key} (whole section)" if dataclasses.is_dataclass(hints[f.name]) else key)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(data[f.name], Mapping):
            out.extend(missing_keys(hints[f.name], data[f.name], key))
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass tree → plain dict (for logging, hashing, writing back to YAML)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → ``{"train.lr": 4e-4, ...}`` (MLflow params, DVC keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field: the documentation table."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
