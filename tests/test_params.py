"""Params schema: defaults mirror params.yaml, and every user mistake is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, apply_overrides, describe, flatten, load_params, to_dict
from pipeline.testing import default_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_yaml_is_valid_and_complete() -> None:
    params = load_params(ROOT / "params.yaml")
    on_disk = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    schema = flatten(to_dict(Params()))
    # params.yaml lists every knob the schema has, so a reader sees them all.
    assert set(on_disk) == set(schema)
    # ...with the schema's defaults, so docs/params.md and tiny test params describe the same pipeline.
    assert flatten(to_dict(params)) == schema
    assert params.extract.hooks


def test_every_knob_is_documented() -> None:
    rows = describe(Params)
    assert rows and all(help_ for _, _, _, help_ in rows), [k for k, _, _, h in rows if not h]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("corpus:\n  contxt_length: 5\n", [], "corpus.contxt_length: unknown key"),
        ("corpus:\n  context_length: many\n", [], "corpus.context_length: 'many' has the wrong type (expected int)"),
        ("corpus:\n  context_length: 1\n", [], "corpus.context_length: 1 is out of range (must be >= 2)"),
        ("model:\n  dtype: float8\n", [], "model.dtype: 'float8' is not allowed (allowed: one of 'float32', 'bfloat16', 'float16')"),
        ("extract:\n  hooks: []\n", [], "extract.hooks: [] is empty"),
        ("extract:\n  batch_size: 3\n  contexts_per_shard: 8\n", [], "extract.contexts_per_shard: 8 is not a multiple"),
        ("seed: 0\n", ["corpus.validation_fraction=1.5"], "corpus.validation_fraction: 1.5 is out of range (must be < 1.0)"),
        ("seed: 0\n", ["nonsense"], "--set 'nonsense': expected dotted.key=value"),
        ("seed: [\n", [], "not valid YAML (line 2)"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(tmp_path: Path, text: str, overrides: list[str], expected: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, text), overrides)
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values() -> None:
    data: dict = {}
    apply_overrides(data, ["train.lr=1e-3", "extract.hooks=[embed, layers.0.mlp_out]", "model.name=gpt2"])
    assert data == {"train": {"lr": 1e-3}, "extract": {"hooks": ["embed", "layers.0.mlp_out"]}, "model": {"name": "gpt2"}}


@pytest.mark.parametrize("raw", ['"2023"', "'2023'", ' "2023" '])
def test_quoted_override_stays_a_string(tmp_path: Path, raw: str) -> None:
    # Before: a quoted number became a float ("2023.0 is not allowed").
    data: dict = {}
    apply_overrides(data, [f"sae.recipe={raw}", "train.lr=1e-3", "seed=3", "model.revision='1e-3'"])
    assert data == {"sae": {"recipe": "2023"}, "train": {"lr": 1e-3}, "seed": 3, "model": {"revision": "1e-3"}}
    assert load_params(_full(tmp_path), [f"sae.recipe={raw}"]).sae.recipe == "2023"


def test_unquoted_number_for_a_string_choice_says_to_quote_it(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"sae.recipe: 2023 is not allowed \(allowed: one of '2024', '2023'\); quote it"):
        load_params(_full(tmp_path), ["sae.recipe=2023"])


def test_unknown_and_missing_keys_are_reported_together(tmp_path: Path) -> None:
    # Before: only the unknown key was named; fixing it then revealed the missing one.
    data = yaml.safe_load(_full(tmp_path, ("train.lr",)).read_text())
    data["train"]["lrate"] = 1e-3
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, yaml.safe_dump(data)))
    msg = str(err.value)
    assert "train.lrate: unknown key" in msg and "missing keys: train.lr (" in msg and "\n" not in msg
    assert msg.index("train.lrate") < msg.index("missing keys")


def _full(tmp_path: Path, drop: tuple[str, ...] = (), **sections: object) -> Path:
    """A complete params file (schema defaults + ``sections``) with the dotted keys in ``drop`` deleted."""
    data = default_params(**sections)
    for key in drop:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        del node[leaf]
    return _write(tmp_path, yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (("train.lr",), "missing keys: train.lr ("),
        (("train.lr", "train.betas", "seed"), "missing keys: seed, train.lr, train.betas ("),
        (("interpret",), "missing keys: interpret (whole section) ("),
        (("steer.hook", "report"), "missing keys: steer.hook, report (whole section) ("),
    ],
)
def test_params_file_missing_keys_names_them_in_one_line(tmp_path: Path, drop: tuple[str, ...], expected: str) -> None:
    # A defaulted key is invisible to DVC (it tracks only keys params.yaml lists): reject, do not default.
    with pytest.raises(ParamsError) as err:
        load_params(_full(tmp_path, drop))
    msg = str(err.value)
    assert expected in msg and "docs/params.md" in msg and "\n" not in msg
    # --set changes values; it does not complete a file.
    with pytest.raises(ParamsError, match="missing keys"):
        load_params(_full(tmp_path, drop), ["train.lr=0.001"])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_params_file_says_so(tmp_path: Path, text: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, text))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'params.yaml'}: empty (expected every section: seed, model, ")
    assert "\n" not in msg


def test_complete_file_with_nulls_and_overrides_loads(tmp_path: Path) -> None:
    # A nullable knob set to null is listed, so present; overrides apply on top of a complete file.
    p = load_params(_full(tmp_path, steer={"hook": None}, train={"grad_clip": None}), ["train.lr=1e-3", "seed=3"])
    assert p.steer.hook is None and p.train.grad_clip is None and p.train.lr == 1e-3 and p.seed == 3


def test_ints_widen_to_float_but_bools_are_not_ints(tmp_path: Path) -> None:
    p = load_params(_full(tmp_path, train={"lr": 1}))
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    with pytest.raises(ParamsError, match="seed: True has the wrong type"):
        load_params(_full(tmp_path, seed=True))


def test_docs_params_md_is_in_sync() -> None:
    from pipeline.params.doc import render

    assert (ROOT / "docs/params.md").read_text() == render(), "run: python -m pipeline.params.doc > docs/params.md"
