"""Whether a commit's ``dvc.lock`` describes the params and code the commit holds (``sae verify``).

``dvc repro`` writes into ``dvc.lock`` the params values and the content hash of every dep each stage
ran with. A commit whose ``params.yaml`` (or code) was changed without rerunning holds metrics of the
*old* params next to the *new* params file: a rerun of that commit computes something else, and no
tolerance should excuse the difference. This module names such a commit's drift; ``sae verify``
stops on it before comparing any metric.

Params are compared value by value, down to the leaves (a stage may list a whole section). Code deps
are compared by DVC's own hash: a file's md5; a folder's md5 of the JSON list of its files'
``{"md5", "relpath"}`` (suffix ``.dir``). Deps that the commit does not hold (data, DVC outputs) are
not checked here. A folder is flagged only when the commit holds at least as many files as the lock
counted, so byte-code caches DVC may have hashed in the workspace cannot raise a false alarm.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LockDrift", "lock_drift", "dvc_hash"]

ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "(absent)"})()


@dataclass
class LockDrift:
    """``params``: ``(file, key, value in dvc.lock, value in the file)`` for every leaf that differs;
    ``deps``: code paths whose content differs from the hash in ``dvc.lock``."""

    params: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.params and not self.deps

    def describe(self) -> list[str]:
        """One line per kind of drift, e.g. ``params.yaml differs from dvc.lock: train.dtype (bfloat16 ->
        float32); run dvc repro``."""
        lines = []
        for file in dict.fromkeys(f for f, *_ in self.params):
            keys = ", ".join(f"{k} ({_show(a)} -> {_show(b)})" for f2, k, a, b in self.params if f2 == file)
            lines.append(f"{file} differs from dvc.lock: {keys}; run dvc repro")
        if self.deps:
            lines.append(f"code differs from dvc.lock: {', '.join(self.deps)}; run dvc repro")
        return lines


def _show(v: Any) -> str:
    return v if isinstance(v, str) else repr(v) if v is ABSENT else json.dumps(v)


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return ABSENT
        tree = tree[part]
    return tree


def _diff(key: str, locked: Any, now: Any) -> Iterator[tuple[str, Any, Any]]:
    """The leaves under ``key`` where ``locked`` and ``now`` differ."""
    if isinstance(locked, Mapping) and isinstance(now, Mapping):
        for k in list(locked) + [k for k in now if k not in locked]:
            yield from _diff(f"{key}.{k}", locked.get(k, ABSENT), now.get(k, ABSENT))
    elif locked != now or type(locked) is not type(now) and not {type(locked), type(now)} <= {int, float}:
        yield key, locked, now


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def dvc_hash(files: Mapping[str, bytes]) -> str:
    """DVC's md5 of a folder from ``{relative posix path: content}``."""
    listing = sorted(({"md5": _md5(data), "relpath": rel} for rel, data in files.items()), key=lambda d: d["relpath"])
    return _md5(json.dumps(listing, sort_keys=True).encode("utf-8")) + ".dir"


def lock_drift(lock: Mapping[str, Any], read_params: Callable[[str], Any], read: Callable[[str], bytes | None],
               list_dir: Callable[[str], Iterable[str]], stages: Iterable[str] | None = None) -> LockDrift:
    """Compare ``lock`` (parsed ``dvc.lock``) with the commit's files.

    ``read_params(file)``: the parsed params file (``None`` when absent); ``read(path)``: a file's bytes at
    the commit, ``None`` when the commit does not hold it; ``list_dir(path)``: the files under a folder at
    the commit (paths relative to the repository), empty when none. ``stages``: only these (default: all).
    """
    wanted = None if stages is None else set(stages)
    out = LockDrift()
    seen: set[tuple[str, str]] = set()
    parsed: dict[str, Any] = {}
    for name, stage in (lock.get("stages") or {}).items():
        if wanted is not None and name not in wanted:
            continue
        for file, values in (stage.get("params") or {}).items():
            if file not in parsed:
                parsed[file] = read_params(file)
            for key, locked in (values or {}).items():
                for leaf, a, b in _diff(key, locked, _lookup(parsed[file], key)):
                    if (file, leaf) not in seen:
                        seen.add((file, leaf))
                        out.params.append((file, leaf, a, b))
        for dep in stage.get("deps") or []:
            path, locked_md5 = dep.get("path"), str(dep.get("md5") or "")
            if not path or dep.get("hash") != "md5" or path in out.deps:  # DVC 2's md5-dos2unix: not recomputed here
                continue
            if locked_md5.endswith(".dir"):
                files = {n[len(path.rstrip("/")) + 1:]: read(n) or b"" for n in list_dir(path)}
                if files and len(files) >= int(dep.get("nfiles") or 0) and dvc_hash(files) != locked_md5:
                    out.deps.append(path)
            else:
                data = read(path)
                if data is not None and _md5(data) != locked_md5:
                    out.deps.append(path)
    return out
