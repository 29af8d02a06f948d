"""dvc.yaml's ``deps`` and ``params`` are complete and precise, traced from the code each stage runs.

DVC reruns a stage only when a listed dep or param changes, so a missing entry serves stale results
silently, and an entry broader than what the stage uses reruns it for nothing. The tracing and the
checks live in ``tests/dvc_trace.py`` (what counts as code, data and params of a stage is explained
there). The checks run on the real dvc.yaml, and on copies broken on purpose, so a blind spot of the
checker itself fails here too.
"""

from __future__ import annotations

import ast
import copy

import pytest
from dvc_trace import (
    ALL,
    ROOT,
    ParamReads,
    code_problems,
    data_problems,
    dvc_stages,
    leaves,
    params_problems,
    reached,
    stage_files,
)

STAGES = dvc_stages()


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_cover_the_code_it_runs(name: str) -> None:
    assert not code_problems(name, STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_cover_the_data_it_reads(name: str) -> None:
    assert not data_problems(name, STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_params_cover_the_keys_it_reads(name: str) -> None:
    assert not params_problems(name, STAGES)


# ---- the checker catches what it is for ------------------------------------------------------------


def _broken(name: str, key: str, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> dict[str, dict]:
    """A copy of dvc.yaml's stages with entries of ``stages[name][key]`` dropped / added."""
    stages = copy.deepcopy(STAGES)
    entries = stages[name][key]
    for d in drop:
        assert d in entries, (name, key, d)
        entries.remove(d)
    entries.extend(add)
    return stages


def _one(problems: list[str], *words: str) -> None:
    assert any(all(w in p for w in words) for p in problems), (words, problems)


def test_a_missing_data_dep_is_reported() -> None:
    _one(data_problems("train", _broken("train", "deps", drop=("data/activations",))), "data/activations", "does not list")
    _one(data_problems("evaluate", _broken("evaluate", "deps", drop=("models/sae",))), "models/sae", "does not list")
    # the report reads the activation manifests (token counts) and the metrics of every stage
    _one(data_problems("report", _broken("report", "deps", drop=("data/activations",))), "data/activations")


def test_an_unread_or_broader_data_dep_is_reported() -> None:
    _one(data_problems("train", _broken("train", "deps", add=("data/interpret",))), "data/interpret", "read by none")
    broad = _broken("steer", "deps", drop=("data/activations", "data/interpret", "data/tokens"), add=("data",))
    _one(data_problems("steer", broad), "data dep data is broader", "data/activations")


def test_the_console_script_is_traced_for_every_stage() -> None:
    # `sae <stage>` runs stages/cli.py first: it sets the numerics mode before any stage module loads.
    for name, stage in STAGES.items():
        assert {"stages/cli.py", "pipeline/numerics.py"} <= stage_files(stage)[0], name
    _one(code_problems("prepare", _broken("prepare", "deps", drop=("stages/cli.py",))), "stages/cli.py", "does not list")


def test_modules_loaded_through_the_architecture_registry_are_traced() -> None:
    files, unresolved = reached("pipeline.sae")
    arch = {f"pipeline/sae/{p.name}" for p in (ROOT / "pipeline" / "sae").glob("*.py")}
    assert arch <= files and not unresolved  # topk.py, gated.py, ... only by name, in the registry's loop
    train = [d for d in STAGES["train"]["deps"] if d.startswith("pipeline/sae")]
    files_listed = _broken("train", "deps", drop=tuple(train), add=tuple(sorted(arch - {"pipeline/sae/gated.py"})))
    _one(code_problems("train", files_listed), "pipeline/sae/gated.py", "does not list")


def test_an_unfollowable_dynamic_import_is_reported(tmp_path, monkeypatch) -> None:
    import dvc_trace

    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "plugins.py").write_text("import importlib\n\ndef load(name):\n    return importlib.import_module(name)\n")
    (pkg / "fixed.py").write_text("import importlib\nimportlib.import_module('pipeline.plugins')\n")
    monkeypatch.setattr(dvc_trace, "ROOT", tmp_path)
    files, unresolved = reached("pipeline.fixed")
    assert files == {"pipeline/fixed.py", "pipeline/plugins.py"} and unresolved == ["pipeline/plugins.py:4"]


def test_a_whole_folder_where_some_files_run_is_reported() -> None:
    # evaluate runs a few modules of pipeline/ (not interpret/, steering/, ...): the folder is too broad.
    code = [d for d in STAGES["evaluate"]["deps"] if d.split("/")[0] == "pipeline"]
    _one(code_problems("evaluate", _broken("evaluate", "deps", drop=tuple(code), add=("pipeline",))),
         "dep pipeline is a whole folder", "pipeline/steering/")
    # a sub-package: interpret runs every module of pipeline/interpret but synthetic.py (tests' data)
    mine = tuple(d for d in STAGES["interpret"]["deps"] if d.startswith("pipeline/interpret/"))
    _one(code_problems("interpret", _broken("interpret", "deps", drop=mine, add=("pipeline/interpret",))),
         "dep pipeline/interpret is a whole folder", "pipeline/interpret/synthetic.py")
    # a folder the stage does not use at all
    _one(code_problems("prepare", _broken("prepare", "deps", add=("pipeline/activations",))),
         "pipeline/activations", "never imports")


def test_a_whole_params_section_where_some_keys_are_read_is_reported() -> None:
    corpus = tuple(k for k in STAGES["extract"]["params"] if isinstance(k, str) and k.startswith("corpus."))
    assert corpus
    _one(params_problems("extract", _broken("extract", "params", drop=corpus, add=("corpus",))),
         "the whole section corpus", "corpus.context_length")
    _one(params_problems("prepare", _broken("prepare", "params", add=({"params.yaml": None},))), "all of params.yaml")
    _one(params_problems("train", _broken("train", "params", drop=("seed",))), "seed", "does not list")
    _one(params_problems("train", _broken("train", "params", add=("report.top_features",))), "never reads")


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
    assert "numerics.portable" in leaves("numerics") and "seed" in leaves("")
