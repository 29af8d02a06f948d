"""The training stream in lanes (pipeline.lanes), in one process: every process's rows of a batch put
together are the one-process batch, for any process count; each reads a 1/N share of the shards and row groups;
every row once per epoch; resuming mid-epoch continues the same stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.activations import open_activations
from pipeline.lanes import LANES, LoaderWork, lane_batches, lane_sizes
from pipeline.loader import epoch_seed
from pipeline.synthetic import write_synthetic_activations

N, B = 4096, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 shards of 256 rows (one row group each): enough to share out among 8 lanes."""
    root = tmp_path_factory.mktemp("lanes") / "train"
    write_synthetic_activations(root, n_tokens=N, d_model=8, n_features=16, k_true=2, seed=2, shard_rows=256,
                                dtype="float16")
    return root


def stream(root: Path, seed: int, part: tuple[int, int] = (0, 1), start: int = 0,
           work: LoaderWork | None = None) -> list[torch.Tensor]:
    return [b.acts for b in lane_batches(open_activations(root), B, seed, start_batch=start, part=part, work=work)]


def test_lane_sizes_sum_to_the_batch() -> None:
    assert lane_sizes(64) == [8] * 8
    assert lane_sizes(12) == [1, 2, 1, 2, 1, 2, 1, 2] and sum(lane_sizes(12)) == 12
    assert len(lane_sizes(3)) == LANES and sum(lane_sizes(3)) == 3  # fewer rows than lanes: some lanes idle


@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_processes_rows_make_the_one_process_batch(data: Path, world: int) -> None:
    one = stream(data, 11)
    parts = [stream(data, 11, part=(r, world)) for r in range(world)]
    assert len(one) == N // B and all(len(p) == len(one) for p in parts)
    for i, batch in enumerate(one):
        assert torch.equal(torch.cat([p[i] for p in parts]), batch), i


def test_every_row_once_per_epoch_and_epochs_differ(data: Path) -> None:
    def rows(batches: object) -> list[tuple[int, int]]:
        return [(int(c), int(p)) for b in batches for c, p in zip(b.context_id, b.position, strict=True)]

    ours = rows(lane_batches(open_activations(data), B, 11))
    assert len(ours) == N and sorted(ours) == sorted(rows(open_activations(data).iter_batches(N)))
    assert not torch.equal(torch.cat(stream(data, 11)), torch.cat(stream(data, epoch_seed(11, 1))))


def test_resume_mid_epoch_continues_the_stream(data: Path) -> None:
    one = stream(data, 11)
    for start in (1, 7, 33):  # 33: inside a shard, mid-piece for every lane
        assert all(torch.equal(a, b) for a, b in zip(stream(data, 11, start=start), one[start:], strict=True))
        assert all(torch.equal(a, b) for a, b in
                   zip(stream(data, 11, part=(1, 2), start=start), [x[B // 2:] for x in one[start:]], strict=True))


def test_each_process_reads_its_share(data: Path) -> None:
    # Per process: rows decoded and shards hashed fall as 1/N (N <= LANES); the whole stream decodes N rows.
    one = LoaderWork()
    stream(data, 11, work=one)
    assert one.rows_decoded == N and one.shards_hashed == 16
    for world in (2, 4, 8):
        works = [LoaderWork() for _ in range(world)]
        for r in range(world):
            stream(data, 11, part=(r, world), work=works[r])
        # Exactly 1/N here (the lanes' ranges fall on shard boundaries): 2048, 1024, 512 rows each.
        assert [w.rows_decoded for w in works] == [N // world] * world
        assert [w.shards_hashed for w in works] == [16 // world] * world
