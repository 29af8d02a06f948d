"""What each dvc.yaml stage runs and reads, traced from the code, and what its entry is missing or has too much.

Used by ``tests/test_dvc_deps.py``. Each ``*_problems(name, stages)`` checks one stage of a parsed
``dvc.yaml`` (``stages``: its ``stages:`` mapping) and returns one line per problem, so the tests can
also feed it a deliberately broken copy and check that the problem is reported.

- **Code**: the files a stage runs are those the ``sae`` console script imports (its module in
  ``pyproject.toml``, ``stages/cli.py``, which sets the numerics mode before any stage) plus those the
  stage's module imports, transitively inside ``pipeline/`` and ``stages/``, imports inside functions
  included. A package that imports every module of its own folder by name
  (``pkgutil.iter_modules(__path__)``, the architecture registry of ``pipeline/sae``) imports them
  all; any other import by a computed name is reported, so the trace cannot silently miss one.
  A folder dep is allowed only when the stage runs every file in it.
- **Data**: the locations of ``pipeline/paths.py`` a run file imports (the one home of what stages hand
  each other; ``stages/paths.py`` re-exports them) are what the stage reads or writes. One related to
  the stage's own outputs (equal, inside or containing one) is taken as written; every other must be
  covered by a data dep, and every data dep must be an output of another stage (or a location read
  whole, like ``metrics``) that the stage reads.
- **Params**: see :class:`ParamReads`. A listed section must be read whole (handed to code the analysis
  does not follow) or key by key entirely; ``params.yaml:`` (the whole file) only where the whole
  ``Params`` object is read.
"""

from __future__ import annotations

import ast
import dataclasses
import pkgutil
import typing
from pathlib import Path, PurePosixPath

import tomllib
import yaml

import pipeline.paths as paths
from pipeline.params import Params
from stages.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CODE = ("pipeline", "stages")
ALL = "*"  # the whole params object
# The modules that name the data locations: their home in the library, and the stages' re-export of it.
LOCATION_MODULES = {"pipeline.paths": "pipeline/paths.py", "stages.paths": "stages/paths.py"}

# Files a stage imports that are not deps, each because it cannot change what a finished stage writes.
# Their own imports are still followed.
NOT_DEPS = {
    "pipeline/__init__.py": "package docstring and __version__ (read by no stage)",
    "stages/__init__.py": "package docstring",
    "pipeline/errors.py": "the UserError class: decides how a failing stage reports, never what a finished one writes",
}
# Params the console script reads by name (not through ``Params``) before any stage, so every stage reads
# them; each with the call that does it, which the checker looks for in the entry module.
ENTRY_READS = {"numerics.portable": "portable_requested"}  # MKL's reproducibility mode, set before torch loads
# Imports by a computed name that the trace resolves itself: the console script's dispatch to the
# stage's module (``COMMANDS``), which the trace adds per stage.
DISPATCH = {"stages/cli.py": "imports COMMANDS[<stage>]'s module: traced as the stage's module"}


def dvc_stages(text: str | None = None) -> dict[str, dict]:
    return yaml.safe_load(text if text is not None else (ROOT / "dvc.yaml").read_text())["stages"]


def entry_module() -> str:
    """The module of the ``sae`` console script (``pyproject.toml``): imported before every stage's module."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return scripts["sae"].split(":")[0]


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


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _is_call_of(node: ast.AST, *names: str) -> bool:
    """``import_module(...)``, ``importlib.import_module(...)``, ``pkgutil.iter_modules(...)``, ..."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id in names) or (isinstance(f, ast.Attribute) and f.attr in names)


def dynamic_imports(path: Path, tree: ast.Module, package: str) -> tuple[set[str], list[str]]:
    """Modules ``path`` imports by name at run time, and the import sites the trace cannot resolve."""
    found: set[str] = set()
    unresolved: list[str] = []
    registry = path.name == "__init__.py" and any(
        _is_call_of(n, "iter_modules") and n.args and isinstance(n.args[0], ast.Name) and n.args[0].id == "__path__"
        for n in ast.walk(tree))
    for node in ast.walk(tree):
        if not _is_call_of(node, "import_module", "__import__"):
            continue
        arg = node.args[0] if node.args else None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.add(arg.value)
        elif registry:  # every module of the package's own folder, as the loop at run time finds them
            found.update(f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path.parent)]))
        elif rel(path) not in DISPATCH:
            unresolved.append(f"{rel(path)}:{node.lineno}")
    return found, unresolved


def imported_modules(path: Path) -> tuple[set[str], list[str]]:
    """Every repository module an import anywhere in ``path`` loads (parent packages included), and the
    dynamic import sites it could not resolve."""
    package = ".".join(path.relative_to(ROOT).parent.parts)  # what relative imports start from
    tree = ast.parse(path.read_text())
    names, unresolved = dynamic_imports(path, tree, package)
    for node in ast.walk(tree):
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
    return {m for m in out if m.split(".")[0] in CODE and module_file(m) is not None}, unresolved


def reached(*modules: str) -> tuple[set[str], list[str]]:
    """Repository files (relative paths) executed when ``modules`` are imported, transitively; and the
    dynamic imports met on the way that the trace could not resolve."""
    seen: set[str] = set()
    unresolved: list[str] = []
    todo = [m for module in modules for m in (module, *(".".join(module.split(".")[:i])
                                                       for i in range(1, module.count(".") + 1)))]
    while todo:
        f = module_file(todo.pop())
        if f is None or rel(f) in seen:
            continue
        seen.add(rel(f))
        found, bad = imported_modules(f)
        todo.extend(found)
        unresolved += bad
    return seen, unresolved


def stage_files(stage: dict) -> tuple[set[str], list[str]]:
    """What ``sae <name>`` runs: the console script's module, then the stage's module."""
    return reached(entry_module(), stage_module(stage))


def covered(path: str, entries: list[str]) -> bool:
    return any(path == e or path.startswith(e.rstrip("/") + "/") for e in entries)


def code_problems(name: str, stages: dict[str, dict]) -> list[str]:
    stage = stages[name]
    deps = [d for d in stage.get("deps", []) if d.split("/")[0] in CODE]
    run, unresolved = stage_files(stage)
    out = [f"{name}: dep {d} does not exist" for d in deps if not (ROOT / d).exists()]
    out += [f"{name}: imports a module by a computed name the trace cannot follow at {u} (teach tests/dvc_trace.py)"
            for u in unresolved]
    missing = sorted(f for f in run if f not in NOT_DEPS and not covered(f, deps))
    if missing:
        out.append(f"{name}: runs these files but does not list them in deps: {missing}")
    unused = sorted(d for d in deps if not any(covered(f, [d]) for f in run))
    if unused:
        out.append(f"{name}: lists deps it never imports: {unused}")
    for d in deps:
        if (ROOT / d).is_dir() and d not in unused:
            idle = sorted(rel(f) for f in (ROOT / d).rglob("*.py") if "__pycache__" not in f.parts and rel(f) not in run)
            if idle:
                out.append(f"{name}: dep {d} is a whole folder but the stage does not run {idle}: "
                           "list the files it runs instead")
    return out


# ---- data ------------------------------------------------------------------------------------------


def _entries(stage: dict, *keys: str) -> list[str]:
    """Paths of ``outs``/``metrics``/``plots`` entries (plain or ``{path: options}``)."""
    return [e if isinstance(e, str) else next(iter(e)) for k in keys for e in stage.get(k, [])]


def locations_used(files: set[str]) -> set[str]:
    """The ``pipeline/paths.py`` locations imported by ``files`` (directly or through the
    ``stages/paths.py`` re-export)."""
    out = set()
    for f in sorted(files):
        if f in LOCATION_MODULES.values():
            continue  # the home (and its re-export) define the locations: importing one is not a read
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in LOCATION_MODULES:
                out.update(PurePosixPath(getattr(paths, a.name)).as_posix() for a in node.names
                           if isinstance(getattr(paths, a.name, None), Path))
            elif (isinstance(node, ast.ImportFrom) and f"{node.module}.paths" in LOCATION_MODULES
                  and any(a.name == "paths" for a in node.names)):
                raise AssertionError(f"{f}: import the locations by name (from pipeline.paths import X) so they can be traced")
    return out


def _related(a: str, b: str) -> bool:
    return covered(a, [b]) or covered(b, [a])


def data_reads(name: str, stages: dict[str, dict]) -> set[str]:
    """Locations the stage reads: the ones its code uses that are not (inside, around) its own outputs."""
    own = _entries(stages[name], "outs", "metrics", "plots")
    return {loc for loc in locations_used(stage_files(stages[name])[0]) if not any(_related(loc, o) for o in own)}


def data_problems(name: str, stages: dict[str, dict]) -> list[str]:
    stage = stages[name]
    deps = [d.rstrip("/") for d in stage.get("deps", []) if d.split("/")[0] not in CODE]
    reads = data_reads(name, stages)
    others = {o for n, s in stages.items() if n != name for o in _entries(s, "outs", "metrics", "plots")}
    out = []
    missing = sorted(r for r in reads if not covered(r, deps))
    if missing:
        out.append(f"{name}: reads {missing} (pipeline/paths.py locations its code imports) but does not list them in deps")
    for d in deps:
        if not any(covered(r, [d]) for r in reads):
            out.append(f"{name}: data dep {d} is read by none of its code (no pipeline/paths.py location it imports)")
        elif d not in others and d not in reads:
            out.append(f"{name}: data dep {d} is broader than what it reads: list the upstream outputs "
                       f"{sorted(o for o in others if covered(o, [d]) and any(_related(o, r) for r in reads))}")
        elif not any(_related(d, o) for o in others):
            out.append(f"{name}: data dep {d} is no other stage's output")
    return out


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


def leaves(section: str) -> set[str]:
    """Every leaf key under ``section`` ("" = all of params.yaml)."""
    out = set()
    for f in dataclasses.fields(schema_type(section)):
        key = f"{section}.{f.name}".lstrip(".")
        out |= leaves(key) if is_section(key) else {key}
    return out


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


def params_problems(name: str, stages: dict[str, dict]) -> list[str]:
    stage = stages[name]
    module = stage_module(stage)
    reads = ParamReads(ast.parse(module_file(module).read_text())).run()  # type: ignore[union-attr]
    if not reads:
        return [f"{module}: found no params read (is the analysis still following `command`?)"]
    entry = module_file(entry_module()).read_text()  # type: ignore[union-attr]
    for key, call in ENTRY_READS.items():
        assert f"{call}(" in entry, f"{entry_module()} no longer calls {call}: update ENTRY_READS"
        reads.add(key)
    listed = listed_params(stage)
    out = []
    for key in listed:
        if key != ALL:
            try:
                schema_type(key)
            except KeyError:
                out.append(f"{name}: lists param {key}, which params.yaml does not have")
    if out:
        return out
    missing = sorted(k if k != ALL else "all of params.yaml (the whole Params object)" for k in reads
                     if not params_covered(k, listed))
    if missing:
        out.append(f"{name}: reads these params but does not list them: {missing}")
    unused = sorted(k for k in listed if not any(params_covered(r, [k]) or params_covered(k, [r]) for r in reads))
    if unused:
        out.append(f"{name}: lists params it never reads: {unused}")
    for key in listed:
        section = "" if key == ALL else key
        if key in unused or ALL in reads or (key != ALL and not is_section(key)) or key in reads:
            continue  # a leaf, or a section read whole
        unread = sorted(k for k in leaves(section) if not params_covered(k, sorted(reads)))
        if unread:
            got = sorted(r for r in reads if params_covered(r, [section]) or not section)
            out.append(f"{name}: lists {'all of params.yaml' if key == ALL else 'the whole section ' + key} but reads "
                       f"only {got} (not {unread}): list those keys")
    return out
