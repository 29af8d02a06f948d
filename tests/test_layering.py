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


# ---- the SAE <-> kernel boundary ----------------------------------------------------------------------------
# The SAEs sit on the kernels: pipeline/sae may import pipeline/kernels (public names), the kernels import
# nothing from pipeline/sae and read an architecture only through the public contract
# (pipeline.kernels.sae_step.SparseArch). Neither side touches a private name the other defines.


def private_names_defined(sources: list[str]) -> set[str]:
    """``_name`` (not dunder) functions, methods, classes, ``self._x = ...`` attributes and module names."""
    out: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                out.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out.add(node.id)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def private_uses(source: str, theirs: set[str], their_package: str) -> list[str]:
    """Where ``source`` imports a private name from ``their_package``, or reads ``obj._x`` / spells ``"_x"`` for a
    private name ``_x`` the other side defines (``self._x`` of a class of one's own is not a crossing)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(their_package):
            hits += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                     if a.name.startswith("_")]
        elif (isinstance(node, ast.Attribute) and node.attr in theirs
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            hits.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in theirs:
            hits.append(f"line {node.lineno}: {node.value!r}")
    return hits


def _sources(folder: str) -> dict[str, str]:
    return {f.relative_to(ROOT).as_posix(): f.read_text() for f in sorted((ROOT / folder).glob("*.py"))}


def test_the_check_sees_a_private_name_crossing() -> None:
    theirs = private_names_defined(["class S:\n    def _recon_loss(self): ...\n    def _x(self):\n        self._ws = 1\n"])
    assert theirs == {"_recon_loss", "_x", "_ws"}
    assert private_uses("def f(sae):\n    return sae._recon_loss(1)\n", theirs, "pipeline.sae")
    assert private_uses("from pipeline.sae.base import _recon_loss\n", set(), "pipeline.sae")
    assert private_uses("def f(sae):\n    return sae.__dict__.setdefault('_ws', {})\n", theirs, "pipeline.sae")
    assert private_uses("def f(sae):\n    return sae.recon_loss(1)\n", theirs, "pipeline.sae") == []


def test_no_private_name_crosses_between_the_saes_and_the_kernels() -> None:
    sae, kernels = _sources("pipeline/sae"), _sources("pipeline/kernels")
    found = {}
    for mine, theirs, package in ((kernels, sae, "pipeline.sae"), (sae, kernels, "pipeline.kernels")):
        names = private_names_defined(list(theirs.values())) - private_names_defined(list(mine.values()))
        for path, source in mine.items():
            if hits := private_uses(source, names, package):
                found[path] = hits
    assert not found, f"use the public contract (pipeline.kernels.sae_step.SparseArch): {found}"


def test_the_kernels_import_nothing_from_the_saes() -> None:
    found = {}
    for path, source in _sources("pipeline/kernels").items():
        package = ".".join(path.removesuffix(".py").split("/")[:-1])
        if hits := sorted(m for m in imported_names(source, package) if m == "pipeline.sae" or m.startswith("pipeline.sae.")):
            found[path] = hits
    assert not found, f"the kernels are the lower floor; read an SAE through SparseArch: {found}"


def test_the_sparse_step_returns_what_the_contract_says() -> None:
    """TopK and BatchTopK provide every member of ``SparseArch``, and the step's ``SparseStep`` becomes the same
    ``LossOutput`` as the dense step's (loss, reconstruction, terms) on a small batch."""
    import torch

    from pipeline.kernels.sae_step import SparseArch, sparse_cpu_training_loss
    from pipeline.sae import SAEConfig, make_sae

    members = {n for n in dir(SparseArch) if not n.startswith("_")} | set(SparseArch.__annotations__)
    for arch in ("topk", "batchtopk"):
        sae = make_sae(SAEConfig(arch=arch, d_in=8, d_sae=32, k=4), seed=0)
        assert not [m for m in members if not hasattr(sae, m)], arch
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        dead = torch.zeros(32, dtype=torch.bool)
        dead[:20] = True
        step = sparse_cpu_training_loss(sae, x, dead)
        assert step.idx.shape == step.val.shape and step.xs_hat.shape == (16, 8)
        sae.kernel_backend = "sparse"
        sparse = sae.training_loss(x, 0, 10, dead)
        sae.kernel_backend = "torch"
        dense = sae.training_loss(x, 0, 10, dead)
        torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
        assert set(sparse.terms) == {"mse", "l0", "auxk"} <= set(dense.terms)
        for name in sparse.terms:
            torch.testing.assert_close(sparse.terms[name], dense.terms[name], rtol=1e-5, atol=1e-5)
