"""Transcoders trained by the pipeline's trainer on (MLP input, MLP output) activation datasets read in lockstep.

The planted map of tests/test_transcoder.py (x = c A, y = c B), written as two aligned datasets
(``layers.1.mlp_in`` and ``layers.1.mlp_out``): the trainer's paired stream must give each input row its own
target (a transcoder trained on its own input, or on rows shifted by one, does not find B); the pairing is checked
and refused with one line when the rows differ; resume stays bit-identical; FVU is measured against the target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from test_transcoder import B, mmcs, pair

from pipeline.activations import open_activations, write_activations
from pipeline.errors import UserError
from pipeline.evaluate import reconstruction_metrics
from pipeline.loader import first_batch, train_batches
from pipeline.pairs import check_aligned, sae_hooks, saved_dictionaries, transcoder_pairs
from pipeline.params import Params, to_dict
from pipeline.params.sae import TrainParams
from pipeline.sae import SAEConfig
from pipeline.train import train_sae
from pipeline.train_setup import kernel_backend

HOOK_IN, HOOK_OUT = "layers.1.mlp_in", "layers.1.mlp_out"
N_ROWS, CTX = 8192, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matmuls run on one thread


def write_pair(root: Path, split: str = "train", shift: int = 0, sample: int = 7) -> tuple[Path, Path]:
    """Aligned input/target datasets of the planted map (the target's rows rolled by ``shift``, ids included)."""
    x, y = (t.numpy() for t in pair(N_ROWS, sample))
    rows = np.arange(N_ROWS)
    ctx, pos, tok = rows // CTX, rows % CTX, (rows * 7) % 101
    roots = root / split / HOOK_IN, root / split / HOOK_OUT
    kw = dict(dtype="float32", shard_rows=3000, context_length=CTX, corpus="planted", split=split)
    write_activations(roots[0], x, ctx, pos, tok, hook=HOOK_IN, **kw)  # type: ignore[arg-type]
    rolled = [np.roll(a, shift, axis=0) for a in (y, ctx, pos, tok)]
    write_activations(roots[1], rolled[0], *rolled[1:], hook=HOOK_OUT, **kw)  # type: ignore[arg-type]
    return roots


def train_cfg(**kw: object) -> TrainParams:
    base = dict(device="cpu", dtype="float32", batch_size=256, lr=3e-3, n_tokens=256 * 160, log_every=100,
                val_every=0, checkpoint_every=0, dead_window_tokens=8192, warmup_steps=0, prefetch=0)
    return TrainParams(**{**base, **kw})  # type: ignore[arg-type]


def train_pair(tmp: Path, x_root: Path, y_root: Path, **kw: object):
    cfg = SAEConfig(arch="transcoder", d_in=32, d_sae=96, k=3, hook=HOOK_IN, hook_out=HOOK_OUT)
    return train_sae(open_activations(x_root), cfg, train_cfg(**kw), tmp / "out", tmp / "ckpt", seed=0,
                     target=open_activations(y_root))


def test_paired_stream_gives_each_input_row_its_own_target(tmp_path: Path) -> None:
    x_root, y_root = write_pair(tmp_path)
    x, y = open_activations(x_root), open_activations(y_root)
    # The single-dataset stream is the paired stream's input half, batch for batch, for any process share.
    for part in ((0, 1), (1, 2)):
        plain = list(train_batches(x, 512, 3, 5, 20, torch.device("cpu"), 0, part))
        both = list(train_batches(x, 512, 3, 5, 20, torch.device("cpu"), 0, part, target=y))
        assert len(plain) == len(both) == 15
        for p, b in zip(plain, both, strict=True):
            assert b.shape == (p.shape[0], 64) and torch.equal(b[:, :32], p)
    # Each input row's target is its own: found by its input's values in the planted pair.
    xs, ys = (t.numpy() for t in pair(N_ROWS, 7))
    row_of = {r.tobytes(): i for i, r in enumerate(xs.astype(np.float32))}
    for b in both[:3]:
        rows = [row_of[r.tobytes()] for r in b[:, :32].numpy()]
        assert np.array_equal(b[:, 32:].numpy(), ys[rows])
    first = first_batch(x, 512, 3, y).acts
    assert first.shape == (512, 64) and torch.equal(first[:, :32], first_batch(x, 512, 3).acts)


def test_trained_transcoder_recovers_the_planted_map_and_validates_against_the_target(tmp_path: Path) -> None:
    x_root, y_root = write_pair(tmp_path)
    vx, vy = write_pair(tmp_path, "validation", sample=8)
    cfg = SAEConfig(arch="transcoder", d_in=32, d_sae=96, k=3, hook=HOOK_IN, hook_out=HOOK_OUT)
    res = train_sae(open_activations(x_root), cfg, train_cfg(val_every=160, val_tokens=2048), tmp_path / "out",
                    tmp_path / "ckpt", seed=0, val_dataset=open_activations(vx), target=open_activations(y_root),
                    val_target=open_activations(vy))
    # Measured 0.97 (the same transcoder fed its own input: 0.41 against B, 0.92 against A).
    assert mmcs(res.sae.W_dec, B) >= 0.9
    direct = reconstruction_metrics(res.sae, open_activations(vx), 2048, target=open_activations(vy))
    assert res.summary["val_fvu@2"] == direct["fvu@2"] < 0.35  # against y: the input's FVU would be ~1
    against_x = reconstruction_metrics(res.sae, open_activations(vx), 2048)
    assert against_x["fvu@2"] > 0.8


def test_shifted_target_rows_are_refused_with_one_line(tmp_path: Path) -> None:
    x_root, y_root = write_pair(tmp_path, shift=1)
    check_aligned(open_activations(x_root), open_activations(y_root))  # same layout: only the rows tell
    with pytest.raises(UserError, match=r"row not aligned with .*mlp_in: target \(context \d+, position \d+\) for input") as e:
        train_pair(tmp_path, x_root, y_root)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="row not aligned"):
        reconstruction_metrics(train_pair(tmp_path, x_root, x_root, n_tokens=256).sae, open_activations(x_root),
                               target=open_activations(y_root))


def test_misaligned_layouts_are_refused(tmp_path: Path) -> None:
    x_root, _ = write_pair(tmp_path)
    x, _y = pair(N_ROWS, 7)
    other = write_activations(tmp_path / "other", x.numpy(), hook=HOOK_OUT, dtype="float32", shard_rows=4096,
                              context_length=CTX, corpus="planted", split="train")
    assert other.n_tokens == N_ROWS
    with pytest.raises(UserError, match=r"not aligned with .*\(rows per shard differ\)"):
        check_aligned(open_activations(x_root), open_activations(tmp_path / "other"))


def test_resume_after_a_kill_is_bit_identical(tmp_path: Path) -> None:
    x_root, y_root = write_pair(tmp_path)
    kw = dict(n_tokens=256 * 40, checkpoint_every=15)
    whole = train_pair(tmp_path / "a", x_root, y_root, **kw).sae.state_dict()

    def kill(step: int) -> None:
        if step == 22:
            raise KeyboardInterrupt

    cfg = SAEConfig(arch="transcoder", d_in=32, d_sae=96, k=3, hook=HOOK_IN, hook_out=HOOK_OUT)
    x, y = open_activations(x_root), open_activations(y_root)
    with pytest.raises(KeyboardInterrupt):
        train_sae(x, cfg, train_cfg(**kw), tmp_path / "b" / "out", tmp_path / "b" / "ckpt", 0, target=y, on_step=kill)
    resumed = train_pair(tmp_path / "b", x_root, y_root, **kw)
    assert resumed.summary["steps"] == 40
    assert all(torch.equal(whole[k], v) for k, v in resumed.sae.state_dict().items())


def test_bring_your_own_pair_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.train import command

    x_root, y_root = write_pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    p = to_dict(Params())
    p["sae"].update(arch="transcoder", expansion=3, k=3)
    p["train"].update(device="cpu", dtype="float32", batch_size=256, n_tokens=256 * 8, log_every=4, val_every=0,
                      checkpoint_every=0)
    Path("params.yaml").write_text(yaml.safe_dump(p))
    res = CliRunner().invoke(command, ["--data", str(x_root), "--target-data", str(y_root), "--out", "tc"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(Path("tc/cfg.json").read_text())
    assert (cfg["architecture"], cfg["hook"], cfg["hook_out"]) == ("transcoder", HOOK_IN, HOOK_OUT)
    res = CliRunner().invoke(command, ["--data", str(x_root), "--out", "tc2"])
    assert res.exit_code == 2 and res.output.startswith("error: --target-data: missing;") and res.output.count("\n") == 1


def test_evaluate_finds_the_saved_dictionaries_and_their_targets(tmp_path: Path) -> None:
    from pipeline.sae import make_sae, save_sae

    hooks = ["layers.0.resid_post", HOOK_IN, HOOK_OUT]
    save_sae(make_sae(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2), seed=0), tmp_path / "sae" / hooks[0])
    assert saved_dictionaries(tmp_path / "sae", hooks) == {h: h for h in hooks}  # SAEs: every hook, dir or not
    save_sae(make_sae(SAEConfig(arch="transcoder", d_in=4, d_sae=8, k=2, hook=HOOK_IN, hook_out=HOOK_OUT), seed=0),
             tmp_path / "tc" / HOOK_IN)
    # A transcoder: its target, and the hooks outside every pair, have no dictionary of their own.
    assert saved_dictionaries(tmp_path / "tc", hooks) == {HOOK_IN: HOOK_OUT}


def test_hook_pairs_and_kernels() -> None:
    hooks = ["layers.0.resid_post", "layers.1.mlp_in", "layers.1.mlp_out", "layers.2.mlp_in", "layers.2.mlp_out"]
    assert transcoder_pairs(hooks) == {"layers.1.mlp_in": "layers.1.mlp_out", "layers.2.mlp_in": "layers.2.mlp_out"}
    assert sae_hooks("transcoder", hooks) == ["layers.1.mlp_in", "layers.2.mlp_in"]
    assert sae_hooks("topk", hooks) == hooks
    for bad, culprit in ((["layers.1.mlp_in"], "'layers.1.mlp_in' has no target.*add 'layers.1.mlp_out'"),
                         (["layers.3.mlp_out"], "'layers.3.mlp_out' has no input.*add 'layers.3.mlp_in'"),
                         (["layers.0.resid_post"], "no layers.{i}.mlp_in hook")):
        with pytest.raises(UserError, match=f"extract.hooks: {culprit}"):
            sae_hooks("transcoder", bad)
    cpu = torch.device("cpu")
    assert kernel_backend("auto", "transcoder", cpu) == "torch"
    for explicit in ("sparse", "triton"):
        with pytest.raises(UserError, match="train.kernels: .* not 'transcoder'"):
            kernel_backend(explicit, "transcoder", cpu)
