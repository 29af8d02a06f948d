"""params.yaml is written the way `dvc exp run -S` writes it back, so an experiment's diff is its one key.

DVC applies ``-S key=value`` with Hydra's override grammar and dumps the file again through ruamel's
round-trip dumper (``dvc.utils.hydra.apply_overrides``): flow lists become block lists, ``null``
becomes an empty value, double quotes become single. A file already in that style is a fixed point,
and a one-key experiment changes one line.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _apply(path: Path, *overrides: str) -> None:
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(path), list(overrides))


def _changed(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_params_yaml_is_a_fixed_point_of_dvcs_writer(tmp_path: Path) -> None:
    p = shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = Path(p).read_text()
    _apply(Path(p), "seed=0")  # a no-op override still rewrites the file
    assert _changed(before, Path(p).read_text()) == [], "params.yaml is not in DVC's write-back style"


@pytest.mark.parametrize("override", ["train.lr=0.001", "sae.k=16", "steer.hook=layers.3.mlp_out",
                                      "corpus.max_documents=100"])
def test_one_key_experiment_changes_one_line(tmp_path: Path, override: str) -> None:
    p = Path(shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml"))
    before = p.read_text()
    _apply(p, override)
    after = p.read_text()
    changed = _changed(before, after)
    assert len(changed) == 2, "\n".join(changed)  # one line out, one line in
    key, value = override.split("=")
    section, name = key.split(".")
    assert yaml.safe_load(after)[section][name] == yaml.safe_load(value)
