"""pipeline/paths.py is the one home of the locations stages hand to each other, and dvc.yaml declares them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

import pipeline.paths as paths

ROOT = Path(__file__).resolve().parents[1]
# Locations one stage writes and another reads. (plots/train is one too, but stages/train.py still
# names it itself; metrics/<stage>.json is each stage's own file, read by the report through METRICS.)
SHARED = re.compile(r"(^|/)(data/(tokens|activations|interpret)|models/sae|reports/(steer|features))(/|$)")


def _spelled(node: ast.AST) -> str:
    """A path expression as text: ``root / "data" / "tokens"`` -> ``*/data/tokens`` (non-literals are ``*``)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return f"{_spelled(node.left)}/{_spelled(node.right)}"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Path" and len(node.args) == 1:
        return _spelled(node.args[0])
    return "*"


def _shared_locations(source: str) -> list[str]:
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
    hits: dict[int, str] = {}  # by line, the outermost expression (ast.walk is breadth-first)
    for n in ast.walk(tree):
        if ((isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) or isinstance(n, ast.Constant))
                and id(n) not in docstrings and SHARED.search(_spelled(n))):
            hits.setdefault(n.lineno, f"line {n.lineno}: {_spelled(n)}")
    return list(hits.values())


def test_the_scan_finds_locations_spelled_out() -> None:
    assert _shared_locations('x = root / "models" / "sae" / hook\n') == ["line 1: */models/sae/*"]
    assert _shared_locations('OUT = Path("reports/steer")\n') == ["line 1: reports/steer"]
    assert _shared_locations('"""Reads data/tokens/."""\nraise E(f"run prepare: {p} not in data/tokens")\n') == []


def test_shared_locations_are_spelled_only_in_pipeline_paths() -> None:
    found = {}
    for f in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")]):
        if f != ROOT / "pipeline" / "paths.py" and (hits := _shared_locations(f.read_text())):
            found[str(f.relative_to(ROOT))] = hits
    assert not found, f"use pipeline.paths instead: {found}"


def test_every_location_is_a_dvc_output_or_dependency() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {str(p) for st in stages.values() for key in ("outs", "deps") for p in st.get(key, [])
                if isinstance(p, str)}
    for name, value in vars(paths).items():
        if isinstance(value, Path):
            assert any(value == Path(d) or Path(d) in value.parents for d in declared), (name, value)
