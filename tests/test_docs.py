"""The docs match the code: ARCHITECTURE.md's signatures, and every file the docs and docstrings name exists."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
CALL = re.compile(r"`(\.?[A-Za-z_]\w*)\(([^`]*?)\)(?:\s*->\s*(\w*)[^`]*)?`")


def _split_args(text: str) -> list[str]:
    """``"a, b: dict[str, int], c=(1, 2), x[N, d]"`` -> ``["a", "b", "c", "x"]`` (top-level commas only)."""
    names, depth, cur = [], 0, ""
    for ch in text + ",":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            if cur.strip():
                names.append(re.match(r"\**(\.\.\.|\w+)", cur.strip()).group(1))  # type: ignore[union-attr]
            cur = ""
        else:
            cur += ch
    return names


def _documented_calls() -> list[tuple[str, str, str, list[str]]]:
    """(module, owner, name, documented parameter names) for each call signature in a "Library API" bullet.

    A bullet names its module first (`` - `pipeline.x`: ``); ``.method(...)`` belongs to the last class named
    (``Cls``, ``Cls(...)`` or ``f(...) -> Cls``)."""
    section = ARCHITECTURE.read_text().split("## Library API", 1)[1].split("\n## ", 1)[0]
    out = []
    for bullet in re.split(r"\n- ", section):
        mod = re.match(r"`(pipeline(?:\.\w+)*)`", bullet.strip("- \n"))
        if not mod:
            continue
        module = importlib.import_module(mod.group(1))
        owner, last = "", []
        for span in re.findall(r"`[^`]*`", bullet):
            if inspect.isclass(getattr(module, span.strip("`"), None)):  # `Cls` alone: methods follow
                owner = span.strip("`")
            if not (call := CALL.fullmatch(span)):
                continue
            name, args, returns = call.groups()
            if name in last:  # a call of an argument, e.g. `intervene(model, hook, fn)` ... `fn(h)`
                continue
            for cls in () if name.startswith(".") else (name, returns):
                if cls and inspect.isclass(getattr(module, cls, None)):
                    owner = cls
            last = _split_args(args)
            out.append((mod.group(1), owner, name, last))
    return out


def test_architecture_signatures_match_the_code() -> None:
    calls = _documented_calls()
    assert len(calls) > 20 and any(name == "ActivationWriter" for _, _, name, _ in calls)
    wrong = []
    for module, owner, name, documented in calls:
        obj = importlib.import_module(module)
        target = getattr(getattr(obj, owner), name[1:]) if name.startswith(".") else getattr(obj, name)
        target = target.__init__ if inspect.isclass(target) else target
        params = [p for p in inspect.signature(target).parameters if p != "self"]
        elided = documented[-1:] == ["..."]
        names = documented[:-1] if elided else documented
        if names != params[: len(names)] or (not elided and len(names) != len(params)):
            wrong.append(f"{module}.{owner + '.' if name.startswith('.') else ''}{name.lstrip('.')}: "
                         f"documented {documented}, code {params}")
    assert not wrong, "\n".join(wrong)


def test_files_named_in_docs_and_docstrings_exist() -> None:
    """A ``*.md`` named in the docs or a docstring is in the repository (or is written by a stage)."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    names = {Path(f).name for f in tracked} | {"summary.md"}  # reports/summary.md: written by `sae report`
    texts = [p for p in tracked if p.endswith((".md", ".py")) and p.startswith(("docs/", "pipeline/", "stages/",
                                                                                   "benchmarks/", "README"))]
    missing = {f"{p}: {m}" for p in texts for m in re.findall(r"\b[\w./-]+\.md\b", (ROOT / p).read_text())
               if Path(m).name not in names}
    assert not missing, sorted(missing)
