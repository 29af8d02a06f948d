"""prepare + extract stages on tiny Llama and GPT-2: stored activations are the model's, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import pipeline.activations as activations
from pipeline.activations import open_activations
from pipeline.testing import tiny_params, write_params
from stages.cli import main


def sae(*args: str) -> None:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _stored(root: Path, split: str, hook: str) -> tuple[np.ndarray, pl.DataFrame]:
    ds = open_activations(root / "data/activations" / split / hook, verify=True)
    acts = np.concatenate([a for a, *_ in ds.iter_arrays()])
    return acts, ds.read_index()


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_stored_activations_equal_hidden_states(arch: str, request, tmp_path: Path, labelled_corpus: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = request.getfixturevalue(arch)
    write_params(tmp_path / "params.yaml", tiny_params(model_dir, labelled_corpus, ["layers.1.resid_post"]))
    monkeypatch.chdir(tmp_path)
    sae("prepare")
    sae("extract")
    acts, index = _stored(tmp_path, "train", "layers.1.resid_post")
    ctx = pl.read_parquet("data/tokens/contexts.parquet").filter(pl.col("split") == "train").sort("context_id")
    ids = torch.tensor(np.stack(ctx["token_ids"].to_numpy()), dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states[2]  # output of block 1
    ref = ref.reshape(-1, ref.shape[-1]).numpy()
    assert acts.shape == ref.shape
    np.testing.assert_allclose(acts.astype(np.float32), ref.astype(np.float16).astype(np.float32), rtol=0, atol=1e-6)
    assert index["token_id"].to_list() == ids.reshape(-1).tolist()
    manifest = open_activations(tmp_path / "data/activations/train/layers.1.resid_post").manifest
    assert manifest.weights_hash and manifest.context_length == 32 and manifest.split == "train"


def test_multi_hook_equals_single_hook(tiny_workspace: Path) -> None:
    hooks = ["embed", "layers.0.attn_out", "layers.1.mlp_out", "layers.2.resid_post"]
    sae("prepare")
    sae("extract", "--set", f"extract.hooks=[{', '.join(hooks)}]")
    multi = {h: _stored(tiny_workspace, "validation", h)[0] for h in hooks}
    for h in hooks:
        sae("extract", "--set", f"extract.hooks=[{h}]")
        single, _ = _stored(tiny_workspace, "validation", h)
        assert np.array_equal(single, multi[h]), h


def test_killed_extract_resumes_to_identical_bytes(tiny_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sae("prepare")
    sae("extract")
    root = tiny_workspace / "data/activations"
    reference = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    for p in list(root.rglob("*.parquet")) + list(root.rglob("manifest.json")):
        p.unlink()

    real = activations.ActivationWriter.write_shard
    calls = {"n": 0}

    def dying(self, index, *args, **kwargs):  # the "kill": the process dies while writing shard 2
        calls["n"] += 1
        if index == 2:
            raise KeyboardInterrupt
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(activations.ActivationWriter, "write_shard", dying)
    res = CliRunner().invoke(main, ["extract"])
    assert res.exit_code == 130
    assert (root / "train/layers.1.resid_post/shard-00000.parquet").exists()
    assert not (root / "train/layers.1.resid_post/manifest.json").exists()
    monkeypatch.setattr(activations.ActivationWriter, "write_shard", real)
    written_before = calls["n"]
    sae("extract")
    after = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert after == reference
    assert written_before >= 2  # shards 0 and 1 were done before the kill and were not recomputed


def test_switching_numerics_mode_rewrites_the_shards(tiny_workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                      restore_numerics: None) -> None:
    # Before: numerics.portable was no part of the job's fingerprint, so a rerun under the other mode kept every
    # shard written under the first (and metrics/extract.json said portable).
    sae("prepare")
    sae("extract")
    root = tiny_workspace / "data/activations"
    first = json.loads((root / "_extract_state.json").read_text())["fingerprint"]
    real = activations.ActivationWriter.write_shard
    calls = {"n": 0}

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(activations.ActivationWriter, "write_shard", counted)
    sae("extract")
    assert calls["n"] == 0  # same job: every shard kept
    sae("extract", "--set", "numerics.portable=true")
    assert json.loads((root / "_extract_state.json").read_text())["fingerprint"] != first
    assert calls["n"] == len(list(root.rglob("shard-*.parquet")))  # every shard rewritten under the new mode


def test_failed_shard_write_is_never_dropped(tiny_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shard 1's write fails at once while the other writes are slow, so the back-pressure wait
    # runs: it used to prune finished futures, the failed one included, and extract exited 0.
    import time

    sae("prepare")
    real = activations.ActivationWriter.write_shard

    def failing(self, index, *args, **kwargs):
        if index == 1:
            raise OSError("disk full")
        time.sleep(0.2)
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(activations.ActivationWriter, "write_shard", failing)
    res = CliRunner().invoke(main, ["extract", "--set", "extract.contexts_per_shard=4"])
    assert isinstance(res.exception, OSError), res.output
    assert not (tiny_workspace / "data/activations/train/layers.1.resid_post/manifest.json").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["extract.hooks=[layers.7.resid_post]"], "extract.hooks: 'layers.7.resid_post'"),
        (["extract.hooks=[layers.0.resid_pre]"], "layers.0.resid_pre"),
        (["model.name=/no/such/model"], "model.name: '/no/such/model'"),
        (["extract.batch_size=0"], "extract.batch_size: 0 is out of range"),
    ],
)
def test_bad_inputs_exit_nonzero_with_one_line(tiny_workspace: Path, overrides: list[str], expected: str) -> None:
    sae("prepare")
    args = ["extract"] + [a for o in overrides for a in ("--set", o)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.output
    assert "Traceback" not in res.output


def test_extract_without_prepare_names_missing_input(tiny_workspace: Path) -> None:
    res = CliRunner().invoke(main, ["extract"])
    assert res.exit_code == 2
    assert "data/tokens/contexts.parquet: missing input" in res.output


def test_auto_batch_size_divides_the_shard(tiny_llama: Path) -> None:
    from pipeline.extract import auto_batch_size

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert auto_batch_size(model, 32, ["layers.0.resid_post"], contexts_per_shard=24, cpu_default=16) == 12
    assert auto_batch_size(model, 32, ["layers.0.resid_post"], contexts_per_shard=8, cpu_default=16) == 8
