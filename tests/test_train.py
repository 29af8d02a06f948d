"""The training loop: exact resume, refused param changes, non-finite errors, learning, schedule, curve."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.activations import open_activations, write_activations
from pipeline.checkpoint import CHECKPOINT_FILE
from pipeline.errors import UserError
from pipeline.lanes import lane_batches
from pipeline.loader import epoch_seed
from pipeline.params.sae import TrainParams
from pipeline.sae import SAEConfig, load_sae
from pipeline.synthetic import write_synthetic_activations
from pipeline.train import CURVE_COLUMNS, train_sae
from pipeline.train_setup import lr_at

D, D_SAE, K = 16, 64, 4


class Killed(Exception):
    pass


def _cfg(**kw) -> SAEConfig:
    return SAEConfig(**{"arch": "topk", "d_in": D, "d_sae": D_SAE, "k": K, "hook": "synthetic", **kw})


def _train_params(**kw) -> TrainParams:
    base = dict(device="cpu", dtype="float32", batch_size=64, lr=3e-3, n_tokens=None, warmup_steps=3, log_every=3, val_every=0,
                checkpoint_every=5, dead_window_tokens=512, prefetch=2)
    return TrainParams(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("acts") / "train"
    # Small row groups and shards so shuffling crosses shard boundaries.
    write_synthetic_activations(root, n_tokens=2048, d_model=D, n_features=48, k_true=3, seed=1, shard_rows=700,
                                dtype="float32")
    return root


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in load_sae(out).state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_after_kill_is_bit_identical(data: Path, tmp_path: Path, dtype: str) -> None:
    ds = open_activations(data)
    ref = train_sae(ds, _cfg(), _train_params(dtype=dtype), tmp_path / "ref", tmp_path / "ref_ckpt", seed=7,
                    curve_path=tmp_path / "ref.csv").sae

    def kill_at_13(step: int) -> None:
        if step == 13:
            raise Killed

    with pytest.raises(Killed):
        train_sae(ds, _cfg(), _train_params(dtype=dtype), tmp_path / "run", tmp_path / "ckpt", seed=7, on_step=kill_at_13)
    assert not (tmp_path / "run" / "sae.safetensors").exists()
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 10 and not state["complete"]  # the last checkpoint before the kill
    # Resume inline (prefetch is not fingerprinted: the stream is the same with or without the thread).
    resumed = train_sae(ds, _cfg(), _train_params(dtype=dtype, prefetch=0), tmp_path / "run", tmp_path / "ckpt", seed=7,
                        curve_path=tmp_path / "run.csv").sae
    ref_sd, res_sd = ref.state_dict(), resumed.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k].cpu(), res_sd[k].cpu()), k
    saved_ref, saved_res = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    for k in saved_ref:
        assert torch.equal(saved_ref[k], saved_res[k]), k
    assert (tmp_path / "ref.csv").read_text() == (tmp_path / "run.csv").read_text()


def test_changed_params_refused_with_changed_keys(data: Path, tmp_path: Path) -> None:
    ds = open_activations(data)

    def kill_at_6(step: int) -> None:
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train_sae(ds, _cfg(), _train_params(), tmp_path / "out", tmp_path / "ckpt", seed=0, on_step=kill_at_6)
    with pytest.raises(UserError, match=r"train\.lr .*k \(4 -> 8\)|sae\.k \(4 -> 8\).*train\.lr") as err:
        train_sae(ds, _cfg(k=8), _train_params(lr=1e-3), tmp_path / "out", tmp_path / "ckpt", seed=0)
    assert "\n" not in str(err.value)
    # Params that cannot change the weights (logging cadence, device, prefetch) are not refused.
    sae = train_sae(ds, _cfg(), _train_params(log_every=4, prefetch=0), tmp_path / "out", tmp_path / "ckpt", seed=0).sae
    assert (tmp_path / "out" / "sae.safetensors").is_file() and sae.cfg.k == K
    # A *finished* run with other params is not resumed: the new experiment trains from scratch.
    train_sae(ds, _cfg(k=8), _train_params(), tmp_path / "out", tmp_path / "ckpt", seed=0)
    assert load_sae(tmp_path / "out").cfg.k == 8


def test_nonfinite_input_names_the_step_and_keeps_checkpoint(tmp_path: Path) -> None:
    B = 32
    x = np.random.default_rng(0).standard_normal((1024, D)).astype(np.float32)
    root = tmp_path / "acts"
    write_activations(root, x, hook="synthetic", dtype="float32")
    ds = open_activations(root)
    # Find where row 500 lands in the seeded stream, then poison it.
    order = torch.cat([b.context_id for b in lane_batches(ds, B, epoch_seed(3, 0))])  # the trainer's stream
    bad_step = int((order == 500).nonzero()[0, 0]) // B
    assert bad_step >= 6, bad_step  # seed 3 keeps the first batch (init_from_data) and one checkpoint clean
    x[500, 3] = np.nan
    write_activations(root, x, hook="synthetic", dtype="float32")
    ds = open_activations(root)
    with pytest.raises(UserError, match=rf"train step {bad_step}: non-finite"):
        train_sae(ds, _cfg(), _train_params(batch_size=B, checkpoint_every=5, log_every=100), tmp_path / "out",
                  tmp_path / "ckpt", seed=3)
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == (bad_step // 5) * 5
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "out" / "sae.safetensors").exists()


def test_training_reduces_fvu_and_writes_curve(tmp_path: Path) -> None:
    train_root, val_root = tmp_path / "train", tmp_path / "val"
    write_synthetic_activations(train_root, 8192, D, n_features=24, k_true=2, seed=2, dtype="float32", scale=30.0)
    write_synthetic_activations(val_root, 1024, D, n_features=24, k_true=2, seed=2, sample_seed=1, dtype="float32",
                                scale=30.0, split="validation")
    rows: list[dict] = []
    params = _train_params(batch_size=128, lr=1e-2, n_tokens=8192 * 3, val_every=100, val_tokens=1024, log_every=16)
    summary = train_sae(open_activations(train_root), _cfg(), params, tmp_path / "out", tmp_path / "ckpt", seed=0,
                        val_dataset=open_activations(val_root), log_fn=rows.append, curve_path=tmp_path / "curve.csv").summary
    assert {r["kind"] for r in rows} == {"train", "val"}  # the summary is returned, not logged
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows[0]["fvu"] > 0.3  # the untrained SAE explains little
    assert train_rows[-1]["fvu"] < 0.1, train_rows[-1]
    assert summary["val_fvu@2"] < 0.1, summary
    assert K - 0.05 < train_rows[-1]["l0"] <= K  # topk: k kept, a few may be clamped to 0 by the ReLU
    assert summary["steps"] == 192 and summary["tokens"] == 192 * 128
    with open(tmp_path / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert tuple(curve[0]) == CURVE_COLUMNS
    assert [int(r["step"]) for r in curve] == list(range(16, 193, 16))
    assert float(curve[-1]["fvu"]) == pytest.approx(train_rows[-1]["fvu"])


def test_lr_schedule() -> None:
    p = TrainParams(lr=1.0, warmup_steps=4, decay="linear", decay_fraction=0.5)
    lrs = [lr_at(s, 20, p) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4:11] == [1.0] * 7
    assert lrs[11:] == pytest.approx([(20 - s) / 10 for s in range(11, 20)])
    cos = dataclasses.replace(p, decay="cosine", warmup_steps=0)
    assert lr_at(0, 10, cos) == 1.0 and lr_at(5, 10, cos) == pytest.approx(0.5)
    assert lr_at(15, 20, dataclasses.replace(p, decay="none")) == 1.0


def test_batch_larger_than_dataset_is_a_user_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train.batch_size: 4096"):
        train_sae(open_activations(data), _cfg(), _train_params(batch_size=4096), tmp_path / "o", tmp_path / "c", 0)


def test_reader_errors_surface_from_the_prefetch_thread(data: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.loader import train_batches

    root = tmp_path / "copy"
    shutil.copytree(data, root)
    ds = open_activations(root)
    inline = list(train_batches(ds, 64, 0, 0, 40, torch.device("cpu"), prefetch=0))
    threaded = list(train_batches(ds, 64, 0, 0, 40, torch.device("cpu"), prefetch=3))
    assert len(inline) == 40 and all(torch.equal(a, b) for a, b in zip(inline, threaded, strict=True))
    # 2048 tokens = 32 batches per epoch: steps 32.. are a second, differently shuffled epoch.
    assert not torch.equal(torch.cat(inline[:32]).sum(0), torch.zeros(D)) and not torch.equal(inline[0], inline[32])
    # A reader failure in the thread is re-raised in the consumer (pipeline.activations decides the
    # exception type: ideally a UserError naming the shard; pyarrow's ArrowInvalid when opening fails).
    import pyarrow as pa

    (root / ds.manifest.shards[-1].file).write_bytes(b"not parquet")
    with pytest.raises((UserError, pa.ArrowInvalid)):
        list(train_batches(ds, 64, 0, 0, 40, torch.device("cpu"), prefetch=3))


def test_autocast_choice() -> None:
    from pipeline.environment import cpu_has_fast_bf16
    from pipeline.train_setup import use_bf16_autocast

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_bf16_autocast("auto", cuda) and not use_bf16_autocast("float32", cuda)
    assert use_bf16_autocast("bfloat16", cpu) and not use_bf16_autocast("float32", cpu)
    assert use_bf16_autocast("auto", cpu) == cpu_has_fast_bf16()


def test_auxk_gets_the_trackers_dead_mask(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One dead-latent record, the trainer's: each step's loss receives the latents that have not fired in the
    # last dead_window_tokens tokens as the step begins, recomputed here from the firing the steps reported.
    from pipeline.sae.topk import TopKSAE

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dead mask given, firing counts) per step
    loss = TopKSAE.training_loss

    def spy(self, x, step, total_steps, dead=None):  # type: ignore[no-untyped-def]
        out = loss(self, x, step, total_steps, dead)
        seen.append((dead.clone(), out.firing(self.cfg.d_sae)[0]))
        return out

    monkeypatch.setattr(TopKSAE, "training_loss", spy)
    B, window = 64, 128  # 2 steps
    train_sae(open_activations(data), _cfg(), _train_params(batch_size=B, dead_window_tokens=window, prefetch=0,
              checkpoint_every=0), tmp_path / "o", tmp_path / "c", seed=0)
    last_fired = torch.full((D_SAE,), -1)  # step index of each latent's last firing
    for step, (dead, counts) in enumerate(seen):
        expected = (step * B - (last_fired + 1) * B) >= window  # tokens so far - tokens at the last firing
        assert torch.equal(dead, expected), step
        last_fired = torch.where(counts > 0, step, last_fired)
    assert any(d.any() for d, _ in seen)  # the case is real: latents went dead and AuxK saw them


def test_tracker_dead_window_and_revival() -> None:
    from pipeline.trainstats import LatentTracker

    t = LatentTracker(4, window_tokens=100, device=torch.device("cpu"))
    t.update(torch.tensor([1, 0, 0, 0]), 60)
    assert not t.dead_mask().any()  # 60 < 100 tokens: nobody dead yet
    t.update(torch.tensor([0, 0, 2, 0]), 40)
    assert t.dead_mask().tolist() == [False, True, False, True]  # silent for exactly 100 tokens: dead
    t.revive(torch.tensor([1]))  # resampled: a fresh window from now
    t.update(torch.tensor([0, 0, 0, 0]), 99)
    assert t.dead_mask().tolist() == [True, False, False, True]
    t.update(torch.tensor([0, 0, 0, 0]), 1)
    assert t.dead_mask().tolist() == [True, True, True, True]
