"""Trustworthy data: every stream checks each shard's sha256 before using a row of it, extract's
resume keeps a shard only if it matches the hash recorded when it was written, a full disk is one line,
and a missing shard or a non-finite first batch is named with what to do."""

from __future__ import annotations

import errno
import itertools
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

import pipeline.activations as activations
import pipeline.activations.reader as reader
import pipeline.activations.writer as writer
import pipeline.io as pio
from pipeline.activations import open_activations, write_activations
from pipeline.errors import UserError
from pipeline.evaluate import reconstruction_metrics
from pipeline.lanes import lane_batches
from pipeline.loader import epoch_seed
from pipeline.params import Params, to_dict
from pipeline.params.sae import TrainParams
from pipeline.sae import SAEConfig, make_sae
from pipeline.train import train_sae
from stages.cli import main

SHARD_ROWS, N_SHARDS, D = 100, 20, 8
HOOK = "layers.0.resid_post"


def flip_data_byte(path: Path) -> None:
    """Flip one byte in the middle of the ``act`` column's data of row group 0 (not the footer or a header).

    Uncompressed Parquet pages carry no checksum here, so pyarrow decodes the damaged shard without complaint."""
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(3)
    assert col.path_in_schema == "act"
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert pq.read_table(path).num_rows == meta.num_rows  # silent for Parquet itself


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """20 shards of 100 rows; ``context_id`` is the row index, so a row's shard is ``context_id // 100``."""
    n = SHARD_ROWS * N_SHARDS
    acts = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    write_activations(tmp_path / "ds", acts, context_id=np.arange(n), hook=HOOK, dtype="float32",
                      shard_rows=SHARD_ROWS)
    return tmp_path / "ds"


def _shards_of(batches: list) -> set[int]:
    return {int(c) // SHARD_ROWS for b in batches for c in b.context_id}


def _drain(stream, into: list) -> None:
    for b in stream:
        into.append(b)


def _mismatch(shard: int) -> str:
    return rf"shard-{shard:05d}\.parquet: sha256 mismatch with manifest\.json .*re-run `sae extract`"


# ---- item 2: verify before use --------------------------------------------------------------------------------


def test_sequential_stream_stops_before_the_corrupted_shard(root: Path) -> None:
    flip_data_byte(root / "shard-00003.parquet")
    got: list = []
    with pytest.raises(UserError, match=_mismatch(3)):
        _drain(open_activations(root).iter_batches(64), got)
    assert len(got) == 4 and _shards_of(got) == {0, 1, 2}  # rows 0-255; the batch reaching into shard 3 never came
    # Resuming in the middle of the shard verifies all of it before its first row.
    with pytest.raises(UserError, match=_mismatch(3)):
        next(open_activations(root).iter_batches(64, start_batch=5))


def test_shuffled_stream_never_yields_a_row_of_the_corrupted_shard(root: Path) -> None:
    clean = list(open_activations(root).iter_batches(64, shuffle=True, seed=3))
    first_use = {s: min(i for i, b in enumerate(clean) if s in _shards_of([b])) for s in range(N_SHARDS)}
    bad = max(first_use, key=first_use.get)  # the shard used last: earlier batches come from clean shards
    flip_data_byte(root / f"shard-{bad:05d}.parquet")
    got: list = []
    with pytest.raises(UserError, match=_mismatch(bad)):
        _drain(open_activations(root).iter_batches(64, shuffle=True, seed=3), got)
    assert 0 < len(got) <= first_use[bad] and bad not in _shards_of(got)


def test_each_shard_is_read_whole_once_and_again_only_if_it_changed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole_reads: list[str] = []
    real = reader._read_whole
    monkeypatch.setattr(reader, "_read_whole", lambda p: whole_reads.append(p.name) or real(p))
    ds = open_activations(root)
    for seed in (0, 1):  # two shuffled epochs, then a sequential pass, on one dataset object
        list(ds.iter_batches(64, shuffle=True, seed=seed))
    list(ds.iter_batches(64))
    assert sorted(whole_reads) == [f"shard-{i:05d}.parquet" for i in range(N_SHARDS)]
    flip_data_byte(root / "shard-00007.parquet")  # modified after it was verified: new mtime, verified again
    with pytest.raises(UserError, match=_mismatch(7)):
        list(ds.iter_batches(64))
    whole_reads.clear()
    ds = open_activations(root)
    with pytest.raises(UserError, match=_mismatch(7)):
        ds.verify()  # hashes shards 0-6, then stops at 7
    assert len(list(itertools.islice(ds.iter_batches(100), 7))) == 7  # shards 0-6: verify() covered them
    assert whole_reads == []


def test_evaluation_stops_on_a_corrupted_shard(root: Path) -> None:
    flip_data_byte(root / "shard-00012.parquet")
    sae = make_sae(SAEConfig(arch="topk", d_in=D, d_sae=16, k=2, hook=HOOK), seed=0)
    with pytest.raises(UserError, match=_mismatch(12)):
        reconstruction_metrics(sae, open_activations(root), batch_size=50)


def _train_params(**kw: object) -> TrainParams:
    base = dict(device="cpu", dtype="float32", batch_size=64, lr=3e-3, n_tokens=None, warmup_steps=2, log_every=4,
                val_every=0, checkpoint_every=0, dead_window_tokens=512, prefetch=2)
    return TrainParams(**{**base, **kw})  # type: ignore[arg-type]


def test_training_stops_before_an_optimizer_step_uses_the_corrupted_shard(root: Path, tmp_path: Path) -> None:
    # Before: a flipped byte in a data page trained silently (rc 0, a different SAE).
    B, seed = 64, 5
    stream = lane_batches(open_activations(root), B, epoch_seed(seed, 0))  # the trainer's stream
    first_use: dict[int, int] = {}
    for i, b in enumerate(stream):
        for s in _shards_of([b]):
            first_use.setdefault(s, i)
    bad = max(first_use, key=first_use.get)
    assert first_use[bad] > 10  # the shuffle reaches it late, so the loop has taken steps before
    flip_data_byte(root / f"shard-{bad:05d}.parquet")
    steps: list[int] = []
    cfg = SAEConfig(arch="topk", d_in=D, d_sae=32, k=4, hook=HOOK)
    with pytest.raises(UserError, match=_mismatch(bad)):
        train_sae(open_activations(root), cfg, _train_params(), tmp_path / "sae", tmp_path / "ckpt", seed,
                  on_step=steps.append)
    assert 0 < len(steps) <= first_use[bad]  # step first_use[bad] would be the first to contain its rows
    assert not (tmp_path / "sae" / "sae.safetensors").exists()


def _params_file(path: Path, hook: str, **train: object) -> Path:
    p = to_dict(Params())
    p["extract"]["hooks"] = [hook]
    p["sae"].update(arch="topk", expansion=4, k=4)
    p["train"].update(device="cpu", dtype="float32", batch_size=64, n_tokens=None, log_every=4, val_every=0,
                      checkpoint_every=5, dead_window_tokens=1024, **train)
    path.write_text(yaml.safe_dump(p))
    return path


def _one_error_line(res, *parts: str) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and all(p in lines[0] for p in parts), lines[0]
    return lines[0]


def test_sae_train_cli_names_the_corrupted_shard_in_one_line(root: Path, tmp_path: Path) -> None:
    flip_data_byte(root / "shard-00000.parquet")
    params = _params_file(tmp_path / "params.yaml", HOOK)
    res = CliRunner().invoke(main, ["train", "--params", str(params), "--data", str(root), "--out", str(tmp_path / "o")])
    _one_error_line(res, f"{root}/shard-00000.parquet: sha256 mismatch with manifest.json")


# ---- item 3: extract's resume keeps a shard only if it matches the hash recorded when it was written ----------


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resumed_extract_rewrites_a_corrupted_shard(tiny_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the resume re-hashed whatever readable shard it found and wrote that hash into the manifest.
    assert CliRunner().invoke(main, ["prepare"]).exit_code == 0
    assert CliRunner().invoke(main, ["extract"]).exit_code == 0
    root = tiny_workspace / "data/activations"
    reference = _files(root)
    hook_dir = root / "train/layers.1.resid_post"
    assert (hook_dir / "shard-00001.parquet.sha256").read_text().split() == [
        activations.sha256_file(hook_dir / "shard-00001.parquet"), "shard-00001.parquet"]
    for p in list(root.rglob("*.parquet")) + list(root.rglob("manifest.json")):
        p.unlink()

    real = activations.ActivationWriter.write_shard
    written: list[int] = []

    def dying(self, index, *args, **kwargs):  # the "kill": the process dies while writing shard 2
        if index == 2:
            raise KeyboardInterrupt
        written.append(index)
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(activations.ActivationWriter, "write_shard", dying)
    assert CliRunner().invoke(main, ["extract"]).exit_code == 130
    monkeypatch.setattr(activations.ActivationWriter, "write_shard", real)
    flip_data_byte(hook_dir / "shard-00001.parquet")  # damaged while the run was stopped
    res = CliRunner().invoke(main, ["extract"])
    assert res.exit_code == 0, res.output
    assert _files(root) == reference  # shard 1 rewritten: manifest, shards and sidecars as uninterrupted

    # A finished dataset: a damaged shard, and one whose sidecar was never written (killed in between), are
    # rewritten by a rerun; intact shards are kept.
    flip_data_byte(hook_dir / "shard-00000.parquet")
    (hook_dir / "shard-00003.parquet.sha256").unlink()
    written.clear()
    monkeypatch.setattr(activations.ActivationWriter, "write_shard",
                        lambda self, index, *a, **k: written.append(index) or real(self, index, *a, **k))
    assert CliRunner().invoke(main, ["extract"]).exit_code == 0
    assert sorted(set(written)) == [0, 3] and _files(root) == reference


# ---- item 6: a full disk is one line naming the file and the space needed --------------------------------------


class _FullDisk:
    """A file on a disk that fills up: half of the first write lands, then ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        self.f.write(bytes(memoryview(data))[: len(memoryview(data).cast("B")) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, module: object, name_part: str) -> None:
    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and name_part in str(path) else f

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_extract_on_a_full_disk_is_one_line_and_leaves_no_partial_shard(tiny_workspace: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert CliRunner().invoke(main, ["prepare"]).exit_code == 0
    with monkeypatch.context() as full:
        _fill_disk_at(full, writer, "shard-00001.parquet")
        res = CliRunner().invoke(main, ["extract"])
    hook_dir = tiny_workspace / "data/activations/train/layers.1.resid_post"
    line = _one_error_line(res, f"{hook_dir.relative_to(tiny_workspace)}/shard-00001.parquet: no space left on device",
                           "still to write need about", "free; free up space and rerun")
    assert " MB" in line or " KB" in line
    assert not list(tiny_workspace.rglob("*.tmp")) and not (hook_dir / "shard-00001.parquet").exists()
    assert not (hook_dir / "manifest.json").exists()
    assert CliRunner().invoke(main, ["extract"]).exit_code == 0  # space freed: the rerun completes
    open_activations(hook_dir, verify=True)


@pytest.mark.parametrize("target", ["state.pt", "sae.safetensors", "train.json"])
def test_train_on_a_full_disk_is_one_line(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          target: str) -> None:
    monkeypatch.chdir(tmp_path)
    hook_root = Path("data/activations/train") / HOOK
    hook_root.parent.mkdir(parents=True)
    root.rename(hook_root)
    _params_file(Path("params.yaml"), HOOK)
    _fill_disk_at(monkeypatch, pio, target)
    res = CliRunner().invoke(main, ["train"])
    path = {"state.pt": f"checkpoints/{HOOK}/state.pt", "sae.safetensors": f"models/sae/{HOOK}/sae.safetensors",
            "train.json": "results/train.json"}[target]
    _one_error_line(res, f"{path}: no space left on device: writing it needs ", " free; free up space and rerun")
    assert not list(tmp_path.rglob("*.tmp")) and not Path(path).exists()


def test_disk_quota_is_named_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def over_quota(*a, **k):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(pio, "fsync_replace", over_quota)
    with pytest.raises(pio.DiskFullError, match=r"out\.bin: disk quota exceeded: writing it needs 3\.0 KB, "):
        pio.atomic_write_bytes(tmp_path / "out.bin", b"x" * 3000)
    assert not list(tmp_path.iterdir())


# ---- item 7: a missing shard says to regenerate it; a non-finite first batch names the dataset and step -------


def test_missing_shard_says_to_rerun_extract(root: Path) -> None:
    # Before: "not a readable Parquet shard (FileNotFoundError); delete it and rerun" - there was nothing to delete.
    ds = open_activations(root)
    (root / "shard-00002.parquet").unlink()
    for read in (lambda: list(ds.iter_batches(64)), ds.verify):
        with pytest.raises(UserError, match=r"shard-00002\.parquet: shard listed in manifest\.json is missing; "
                                            r"re-run `sae extract`") as e:
            read()
        assert "delete" not in str(e.value)


def test_nan_in_the_first_batch_names_dataset_and_step(tmp_path: Path) -> None:
    acts = np.random.default_rng(0).standard_normal((512, D)).astype(np.float32)
    acts[:, 3] = np.nan
    write_activations(tmp_path / "nan", acts, hook=HOOK, dtype="float32")
    cfg = SAEConfig(arch="topk", d_in=D, d_sae=32, k=4, hook=HOOK)
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path))}/nan: non-finite activations \(NaN/inf\) in the batch at step 0 "
                                        r"\(init_from_data\), first at context_id \d+, position 0"):
        train_sae(open_activations(tmp_path / "nan"), cfg, _train_params(), tmp_path / "o", tmp_path / "c", 0)
    zeros = torch.zeros(512, D)
    write_activations(tmp_path / "zeros", zeros, hook=HOOK, dtype="float32")
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path))}/zeros: the batch at step 0: init_from_data: .*all zeros"):
        train_sae(open_activations(tmp_path / "zeros"), cfg, _train_params(), tmp_path / "o", tmp_path / "c", 0)
