"""Activation dataset API: exact round trip, streaming, seeded shuffle, resume cursor, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.activations import open_activations, write_activations
from pipeline.errors import UserError


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((1000, 24)).astype(np.float16)
    write_activations(tmp_path / "ds", acts, context_id=np.arange(1000) // 10, position=np.arange(1000) % 10,
                      token_id=np.arange(1000) % 7, hook="layers.0.resid_post", shard_rows=300, model_id="m")
    return tmp_path / "ds", acts


def test_round_trip_is_exact_and_manifest_complete(dataset) -> None:
    root, acts = dataset
    ds = open_activations(root, verify=True)
    m = json.loads((root / "manifest.json").read_text())
    assert m["n_tokens"] == 1000 and m["d_model"] == 24 and m["hook"] == "layers.0.resid_post"
    assert [s["rows"] for s in m["shards"]] == [300, 300, 300, 100]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    batches = list(ds.iter_batches(128))
    got = torch.cat([b.acts for b in batches])
    assert torch.equal(got, torch.from_numpy(acts).float())
    assert [len(b.acts) for b in batches][-1] == 1000 - 7 * 128
    assert torch.equal(torch.cat([b.position for b in batches]), torch.arange(1000) % 10)
    idx = ds.read_index()
    assert idx.columns == ["context_id", "position", "token_id"] and idx.height == 1000


def test_shuffle_is_seeded_a_permutation_and_resumable(dataset) -> None:
    root, acts = dataset
    ds = open_activations(root)
    a = torch.cat([b.acts for b in ds.iter_batches(100, shuffle=True, seed=1)])
    b = torch.cat([b.acts for b in ds.iter_batches(100, shuffle=True, seed=1)])
    c = torch.cat([b.acts for b in ds.iter_batches(100, shuffle=True, seed=2)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, torch.from_numpy(acts).float())
    assert torch.equal(a.sort(dim=0).values, torch.from_numpy(acts).float().sort(dim=0).values)
    resumed = torch.cat([b.acts for b in ds.iter_batches(100, shuffle=True, seed=1, start_batch=4)])
    assert torch.equal(resumed, a[400:])


def test_float32_storage(tmp_path: Path) -> None:
    x = torch.randn(50, 8)
    write_activations(tmp_path / "f32", x, dtype="float32")
    got = torch.cat([b.acts for b in open_activations(tmp_path / "f32").iter_batches(64)])
    assert torch.equal(got, x)


def test_corrupted_shard_is_named(dataset) -> None:
    root, _ = dataset
    shard = root / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-00001.parquet: sha256 mismatch"):
        open_activations(root, verify=True)


def test_truncated_and_missing_shards_are_named(dataset) -> None:
    root, _ = dataset
    (root / "shard-00002.parquet").write_bytes((root / "shard-00002.parquet").read_bytes()[:100])
    with pytest.raises(UserError, match="shard-00002.parquet: not a readable Parquet shard"):
        open_activations(root).verify()
    (root / "shard-00000.parquet").unlink()
    with pytest.raises(UserError, match="shard-00000.parquet: shard listed in manifest.json is missing; re-run"):
        open_activations(root).verify(checksums=False)


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an activation dataset"):
        open_activations(tmp_path)


def test_resume_cursor_reads_nothing_before_it(dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = dataset
    ds = open_activations(root)
    full = list(ds.iter_batches(70, shuffle=True, seed=5, device="cpu"))
    read = []
    real = __import__("pyarrow.parquet", fromlist=["ParquetFile"]).ParquetFile.read_row_group

    def counting(self, i, *a, **k):
        read.append(i)
        return real(self, i, *a, **k)

    monkeypatch.setattr("pyarrow.parquet.ParquetFile.read_row_group", counting)
    for start in (0, 3, 9, 14):
        got = list(ds.iter_batches(70, shuffle=True, seed=5, start_batch=start))
        assert len(got) == len(full) - start
        assert all(torch.equal(g.acts, f.acts) for g, f in zip(got, full[start:], strict=False))
    read.clear()
    list(ds.iter_batches(70, seed=5, start_batch=12))  # sequential: 840 rows in; shards 0-1 (600 rows) never read
    assert len(read) == 2  # shard 2 (straddles the cursor) and shard 3; a full pass reads 4


@pytest.mark.parametrize("shuffle", [True, False])
def test_only_the_shards_being_read_stay_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shuffle: bool) -> None:
    # Keeping every shard open grew host memory with the dataset size (~55 MB per chunk on a 20 GB dataset).
    from pipeline.activations.reader import ActivationDataset

    acts = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    write_activations(tmp_path / "ds", acts, shard_rows=20)  # 20 shards
    ds = open_activations(tmp_path / "ds")
    opened = []
    real = ActivationDataset._open

    def tracking(self, index):
        f = real(self, index)
        opened.append(f)
        return f

    monkeypatch.setattr(ActivationDataset, "_open", tracking)
    n_open = []
    for _ in ds.iter_arrays(shuffle=shuffle, buffer_groups=2):
        n_open.append(sum(not f.closed for f in opened))
    assert len(n_open) == (10 if shuffle else 20) and max(n_open) <= 4  # this chunk's and the next's shards
    assert all(f.closed for f in opened)
    stream = ds.iter_arrays(shuffle=shuffle, buffer_groups=2)
    next(stream)
    stream.close()  # the consumer stops early: nothing is left open
    assert all(f.closed for f in opened)
