"""The import graph keeps its floors: the library (``pipeline/``) never imports the CLI stages (``stages/``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_names(source: str, package: str) -> set[str]:
    """Every module an import in ``source`` names (imports inside functions included), relative imports
    resolved against ``package`` (the dotted package of the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            out.add(str(node.args[0].value))
    return out


def stages_imports(source: str, package: str = "pipeline") -> list[str]:
    return sorted(m for m in imported_names(source, package) if m == "stages" or m.startswith("stages."))


def test_the_check_sees_every_spelling_of_a_stages_import() -> None:
    assert stages_imports("from stages.paths import METRICS\n")
    assert stages_imports("def f():\n    import stages.cli\n")
    assert stages_imports("from stages import paths\n")
    assert stages_imports("import importlib\nimportlib.import_module('stages.train')\n")
    assert stages_imports("from .. import stages\n", "pipeline.report") == []  # that is pipeline.stages
    assert stages_imports("from pipeline.paths import METRICS\nimport stagesx\n") == []


def test_the_library_never_imports_the_stages() -> None:
    found = {}
    for f in sorted(ROOT.glob("pipeline/**/*.py")):
        package = ".".join(f.relative_to(ROOT).with_suffix("").parts[:-1])
        if hits := stages_imports(f.read_text(), package):
            found[f.relative_to(ROOT).as_posix()] = hits
    assert not found, f"pipeline/ is the lower floor; take data locations from pipeline.paths: {found}"
