"""``sae train`` end to end on small synthetic activation datasets: declared outputs, bring-your-own
data (``--data/--out`` and the Python entry point), and the one-line refusal of a changed resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.params import Params, to_dict
from pipeline.params.sae import SAEParams, TrainParams
from pipeline.sae import load_sae
from pipeline.synthetic import write_synthetic_activations

HOOK = "layers.2.resid_post"
D = 16


def _params_file(tmp: Path, **train: object) -> Path:
    p = to_dict(Params())
    p["extract"]["hooks"] = [HOOK]
    p["sae"].update(arch="topk", expansion=4, k=4)
    p["train"].update(device="cpu", dtype="float32", batch_size=64, lr=3e-3, n_tokens=None, log_every=4, val_every=8,
                      val_tokens=256, checkpoint_every=5, dead_window_tokens=1024, **train)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for split, n, sample in (("train", 1280, 0), ("validation", 320, 1)):
        write_synthetic_activations(Path("data/activations") / split / HOOK, n, D, n_features=24, k_true=2, seed=4,
                                    sample_seed=sample, hook=HOOK, dtype="float16", shard_rows=500, split=split)
    _params_file(tmp_path)
    return tmp_path


def test_train_stage_writes_declared_outputs(workspace: Path) -> None:
    from stages.train import command

    res = CliRunner().invoke(command, [])
    assert res.exit_code == 0, res.output
    sae = load_sae(Path("models/sae") / HOOK)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook) == (D, 4 * D, 4, HOOK)
    cfg = json.loads((Path("models/sae") / HOOK / "cfg.json").read_text())
    assert cfg["training"]["batch_size"] == 64 and cfg["training"]["seed"] == 0
    m = json.loads(Path("results/train.json").read_text())[HOOK]
    assert m["steps"] == 20 and m["tokens"] == 1280  # one pass, 1280 // 64
    assert 0 <= m["val_fvu@2"] < 1 and m["l0@1"] == 4.0
    with open(Path("plots/train") / f"{HOOK}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20]
    assert {"step", "tokens", "loss", "l0", "fvu", "dead_fraction"} <= set(rows[0])
    state = Path("checkpoints") / HOOK / "state.pt"
    assert state.is_file() and not list(Path("checkpoints", HOOK).glob("*.tmp"))
    # A rerun (finished checkpoint: trains from scratch) reproduces metrics and weights exactly.
    first = Path("results/train.json").read_bytes()
    assert CliRunner().invoke(command, []).exit_code == 0
    assert Path("results/train.json").read_bytes() == first
    again = load_sae(Path("models/sae") / HOOK)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), again.state_dict().values(), strict=True))


def test_params_file_missing_a_key_stops_before_training(workspace: Path) -> None:
    # Before: a deleted train.lr trained silently with the schema default, invisible to DVC.
    from stages.train import command

    data = yaml.safe_load(Path("params.yaml").read_text())
    del data["train"]["lr"]
    Path("params.yaml").write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(command, [])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith("error: params.yaml: missing keys: train.lr (") and "\n" not in line, res.output
    assert not Path("models/sae").exists() and not Path("results/train.json").exists()
    Path("params.yaml").write_text("")
    res = CliRunner().invoke(command, [])
    assert res.exit_code == 2 and res.output.startswith("error: params.yaml: empty (expected every section: "), res.output


def test_missing_validation_dataset_is_one_line_error(workspace: Path) -> None:
    # Before: exit 0, and metrics/train.json silently had no val_* entries although train.val_every was 8.
    from stages.train import command

    manifest = Path("data/activations/validation") / HOOK / "manifest.json"
    manifest.unlink()
    res = CliRunner().invoke(command, [])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.startswith(f"error: {manifest}: missing input (train.val_every is 8)") and "\n" not in line, res.output
    assert not Path("models/sae").exists() and not Path("results/train.json").exists()
    # train.val_every 0 asks for no validation pass before the end: trains, without val_* metrics.
    res = CliRunner().invoke(command, ["--set", "train.val_every=0"])
    assert res.exit_code == 0, res.output
    m = json.loads(Path("results/train.json").read_text())[HOOK]
    assert m["steps"] == 20 and not any(k.startswith("val_") for k in m)


def test_changed_params_on_resume_is_one_line_error(workspace: Path) -> None:
    from pipeline.activations import open_activations
    from pipeline.train import sae_config, train_sae
    from stages.train import command

    params = TrainParams(device="cpu", dtype="float32", batch_size=64, lr=3e-3, n_tokens=None, log_every=4, val_every=8, val_tokens=256,
                         checkpoint_every=5, dead_window_tokens=1024)
    sae_params = SAEParams(arch="topk", expansion=4, k=4)
    ds = open_activations(Path("data/activations/train") / HOOK)

    def kill(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(ds, sae_config((sae_params, params), D, HOOK), params, Path("models/sae") / HOOK,
                  Path("checkpoints") / HOOK, seed=0, on_step=kill)
    res = CliRunner().invoke(command, ["--set", "train.lr=0.01", "--set", "train.warmup_steps=5"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith("error: ") and "\n" not in line, res.output
    assert "train.lr (0.003 -> 0.01)" in line
    assert "train.warmup_steps (10 -> 5)" in line
    # Same params: resumes and finishes.
    res = CliRunner().invoke(command, [])
    assert res.exit_code == 0, res.output
    assert json.loads(Path("results/train.json").read_text())[HOOK]["steps"] == 20


def test_resume_under_other_numerics_is_refused(workspace: Path, restore_numerics: None) -> None:
    # Before: the checkpoint's fingerprint had no numerics, so a run killed under one mode resumed under the other.
    from stages.train import command

    def kill(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:  # the stage's run is killed after step 7
        import pipeline.train as train

        real = train.train_sae
        mp.setattr(train, "train_sae", lambda *a, **k: real(*a, **k, on_step=kill))
        assert CliRunner().invoke(command, []).exit_code != 0
    assert (Path("checkpoints") / HOOK / "state.pt").is_file()
    res = CliRunner().invoke(command, ["--set", "numerics.portable=true"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.startswith("error: ") and "cannot resume, params changed since the checkpoint" in line, res.output
    assert "numerics.deterministic (false -> true)" in line and "\n" not in line
    assert not Path("results/train.json").exists()


def test_train_on_your_own_activations(workspace: Path, tmp_path: Path) -> None:
    from pipeline.train import train_on_dataset
    from stages.train import command

    mine = tmp_path / "my_acts"
    write_synthetic_activations(mine, 640, D, n_features=24, k_true=2, seed=5, hook="my.hook", dtype="float32")
    res = CliRunner().invoke(command, ["--data", str(mine), "--out", str(tmp_path / "my_sae"),
                                       "--set", "train.val_every=0"])
    assert res.exit_code == 0, res.output
    sae = load_sae(tmp_path / "my_sae")
    assert sae.cfg.hook == "my.hook" and sae.cfg.d_sae == 4 * D
    assert (tmp_path / "my_sae" / "train_curve.csv").is_file()
    summary = train_on_dataset(mine, tmp_path / "py_sae", SAEParams(arch="topk", expansion=2, k=3),
                               TrainParams(device="cpu", batch_size=32, n_tokens=320, val_every=0, lr=3e-3),
                               val_data=Path("data/activations/validation") / HOOK)
    assert summary["steps"] == 10 and "val_fvu@2" in summary
    assert load_sae(tmp_path / "py_sae").cfg.d_sae == 2 * D
    res = CliRunner().invoke(command, ["--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--out need --data" in res.output
