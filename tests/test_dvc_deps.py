"""dvc.yaml's ``deps`` and ``params`` are complete, traced from the code each stage runs.

DVC reruns a stage only when a listed dep or param changes, so a missing entry serves stale results
silently. For every stage (``cmd: sae <name>`` -> its module in ``stages.cli.COMMANDS``) this test
- follows its imports statically and transitively inside ``pipeline/`` and ``stages/`` (imports inside
  functions included) and requires every reached file to be covered by a dep (a directory covers its
  files), and every code dep to cover a reached file;
- follows the ``Params`` object from the stage's ``command`` through aliases (``p = params.steer``),
  tuple assignments and calls of the module's own functions, and requires each key read to be covered
  by the stage's ``params``. A section handed to anything else (``evaluate_steering(..., p)``) is read
  whole, and so is the whole object (``to_dict(params)``: all of ``params.yaml``). Every listed key
  must exist and be read.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params
from stages.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CODE = ("pipeline", "stages")
ALL = "*"  # the whole params object

# Files a stage imports that are not deps, each because it cannot change what a finished stage writes.
# Their own imports are still followed.
NOT_DEPS = {
    "pipeline/__init__.py": "package docstring and __version__ (read by no stage)",
    "stages/__init__.py": "package docstring",
    "pipeline/errors.py": "the UserError class: decides how a failing stage reports, never what a finished one writes",
}


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    """``cmd: sae <name>`` -> ``stages.<name>`` (what the ``sae`` console script imports for it)."""
    prog, name = stage["cmd"].split()
    assert prog == "sae" and name in COMMANDS, stage["cmd"]
    module, attr = COMMANDS[name][0].split(":")
    assert attr == "command", COMMANDS[name]
    return module


# ---- imports ---------------------------------------------------------------------------------------


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` anywhere in ``path`` loads, its parent packages included."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the containing package, one level up per extra dot
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return {m for m in out if m.split(".")[0] in CODE and module_file(m) is not None}


def reached_files(module: str) -> set[str]:
    """Repository files (relative paths) executed when ``module`` is imported, transitively."""
    seen: set[str] = set()
    todo = [module, *(".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1))]
    while todo:
        f = module_file(todo.pop())
        rel = f.relative_to(ROOT).as_posix() if f else None
        if rel is None or rel in seen:
            continue
        seen.add(rel)
        todo.extend(imported_modules(f))
    return seen


def covered(path: str, entries: list[str]) -> bool:
    return any(path == e or path.startswith(e.rstrip("/") + "/") for e in entries)


# ---- params ----------------------------------------------------------------------------------------


def schema_type(path: str) -> typing.Any:
    """The type of the params key ``path`` ("" = ``Params``); KeyError if there is no such key."""
    tp: typing.Any = Params
    for part in filter(None, path.split(".")):
        if not dataclasses.is_dataclass(tp):
            raise KeyError(path)
        tp = typing.get_type_hints(tp)[part]
    return tp


def is_section(path: str) -> bool:
    return dataclasses.is_dataclass(schema_type(path))


class ParamReads:
    """Params keys a stage module reads, following the object from ``command(params)``."""

    def __init__(self, tree: ast.Module) -> None:
        self.funcs = {f.name: f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.parent = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        self.bound: dict[str, dict[str, set[str]]] = {name: {} for name in self.funcs}
        self.reads: set[str] = set()

    def run(self, entry: str = "command") -> set[str]:
        fn = self.funcs[entry]
        self.bound[entry][fn.args.args[0].arg] = {""}  # the stage decorator passes Params first
        todo = [entry]
        while todo:
            todo.extend(self.analyse(todo.pop()))
        return self.reads

    def resolve(self, node: ast.AST, env: dict[str, set[str]]) -> set[str]:
        """The params paths ``node`` may evaluate to (empty: not a params object)."""
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            return env.get(node.id, set())
        if isinstance(node, ast.Attribute):
            base = {p for p in self.resolve(node.value, env) if is_section(p)}
            fields = {p for p in base if node.attr in {f.name for f in dataclasses.fields(schema_type(p))}}
            return {f"{p}.{node.attr}".lstrip(".") for p in fields}
        return set()

    def bind(self, target: ast.AST, value: ast.AST, env: dict[str, set[str]], consumed: set[int]) -> None:
        """Aliases: ``p = params.steer``, ``m, x = params.model, params.extract``, ``a = b if c else d``."""
        if isinstance(value, ast.IfExp):
            self.bind(target, value.body, env, consumed)
            self.bind(target, value.orelse, env, consumed)
        elif isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
            if len(target.elts) == len(value.elts):
                for t, v in zip(target.elts, value.elts, strict=True):
                    self.bind(t, v, env, consumed)
        elif isinstance(target, ast.Name):
            paths = {p for p in self.resolve(value, env) if is_section(p)}  # leaves are recorded where read
            if paths:
                env.setdefault(target.id, set()).update(paths)
                consumed.add(id(value))

    def analyse(self, name: str) -> list[str]:
        fn, env = self.funcs[name], {k: set(v) for k, v in self.bound[name].items()}
        consumed: set[int] = set()
        for _ in range(10):  # aliases of aliases, to a fixed point
            before = {k: set(v) for k, v in env.items()}
            for node in ast.walk(fn):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        self.bind(target, node.value, env, consumed)
            if env == before:
                break
        changed: list[str] = []
        for node in ast.walk(fn):
            paths = self.resolve(node, env)
            parent = self.parent.get(id(node))
            if not paths or id(node) in consumed or (parent is not None and self.resolve(parent, env)):
                continue  # not params, an alias definition, or part of a longer chain
            whole = {p for p in paths if is_section(p)}
            self.reads |= paths - whole
            if not whole:
                continue
            if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name):
                callee = parent.func.id
                if callee == "isinstance" and parent.args and parent.args[0] is node:
                    continue
                param = self.parameter(callee, parent, node)
                if param is not None:  # one of this module's functions: follow the object into it
                    got = self.bound[callee].setdefault(param, set())
                    if not whole <= got:
                        got |= whole
                        changed.append(callee)
                    continue
            self.reads |= {p or ALL for p in whole}  # handed to code we do not follow: read whole
        return changed

    def parameter(self, callee: str, call: ast.Call, arg: ast.AST) -> str | None:
        """The parameter of local function ``callee`` that ``arg`` of ``call`` binds to."""
        if callee not in self.funcs:
            return None
        a = self.funcs[callee].args
        positional = [p.arg for p in a.posonlyargs + a.args]
        for i, v in enumerate(call.args):
            if v is arg and i < len(positional) and not any(isinstance(x, ast.Starred) for x in call.args[: i + 1]):
                return positional[i]
        for kw in call.keywords:
            if kw.value is arg and kw.arg in positional + [p.arg for p in a.kwonlyargs]:
                return kw.arg
        return None


def listed_params(stage: dict) -> list[str]:
    """The stage's ``params`` keys; a whole-file entry (``- params.yaml:``) lists everything."""
    keys: list[str] = []
    for entry in stage.get("params", []):
        if isinstance(entry, dict):
            for file, sub in entry.items():
                assert file == "params.yaml", f"params from {file}: the pipeline reads only params.yaml"
                keys += [ALL] if sub is None else list(sub)
        else:
            keys.append(entry)
    return keys


def params_covered(key: str, listed: list[str]) -> bool:
    return ALL in listed or any(key == k or key.startswith(k + ".") for k in listed)


# ---- the checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_stage_deps_cover_the_code_it_runs(name: str) -> None:
    stage = dvc_stages()[name]
    deps = [d for d in stage.get("deps", []) if d.split("/")[0] in CODE]
    for d in deps:
        assert (ROOT / d).exists(), f"{name}: dep {d} does not exist"
    reached = reached_files(stage_module(stage))
    missing = sorted(f for f in reached if f not in NOT_DEPS and not covered(f, deps))
    assert not missing, f"dvc.yaml stage {name} runs these files but does not list them in deps: {missing}"
    unused = sorted(d for d in deps if not any(covered(f, [d]) for f in reached))
    assert not unused, f"dvc.yaml stage {name} lists deps it never imports: {unused}"


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_stage_params_cover_the_keys_it_reads(name: str) -> None:
    stage = dvc_stages()[name]
    module = stage_module(stage)
    reads = ParamReads(ast.parse(module_file(module).read_text())).run()
    assert reads, f"{module}: found no params read (is the analysis still following `command`?)"
    listed = listed_params(stage)
    for key in listed:
        if key != ALL:
            try:
                schema_type(key)
            except KeyError:
                pytest.fail(f"dvc.yaml stage {name} lists param {key}, which params.yaml does not have")
    missing = sorted(k if k != ALL else "all of params.yaml (the whole Params object)" for k in reads
                     if not params_covered(k, listed))
    assert not missing, f"dvc.yaml stage {name} reads these params but does not list them: {missing}"
    unused = sorted(k for k in listed if not any(params_covered(r, [k]) or params_covered(k, [r]) for r in reads))
    assert not unused, f"dvc.yaml stage {name} lists params it never reads: {unused}"


def test_the_analysis_follows_aliases_calls_and_sections() -> None:
    src = '''
def command(params):
    m, x = params.model, params.extract
    p = params.steer
    q = p
    helper(params, x)
    run(params.train.lr, m.name, q.hook, params.extract.hooks[0])
    evaluate(p)

def helper(params, ex):
    if isinstance(params, int):
        return
    ev = params.evaluate if ex.dtype else params.evaluate
    return ev.batch_size, to_dict(params.sae)

def unused(params):
    return params.report.top_features
'''
    reads = ParamReads(ast.parse(src)).run()
    assert reads == {"extract.dtype", "extract.hooks", "train.lr", "model.name", "steer.hook", "steer",
                     "evaluate.batch_size", "sae"}
    assert ParamReads(ast.parse("def command(params):\n    log(to_dict(params))\n")).run() == {ALL}
