"""benchmarks/scaling.py: the headline numbers are read at the highest definition version; the plot is written."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from bench_load import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("scaling")


def test_latest_version_wins_and_prefix_is_exact(bench: ModuleType) -> None:
    m = {"fvu@2": 0.3, "fvu@3": 0.2, "fvu@10": 0.1, "fvu_extra@9": 5.0, "fvu@x": 7.0}
    assert bench.latest(m, "fvu@") == ("fvu@10", 0.1)  # numeric, not lexicographic, order
    assert bench.latest(m, "l0@") is None


def test_headline_reads_each_stage_file(bench: ModuleType) -> None:
    per_stage = {"evaluate": {"fvu@3": 0.2, "ce_loss_recovered@2": 0.95, "dead_fraction@1": 0.1},
                 "interpret": {"median_topic_auroc@1": 0.7, "frac_topic_auroc_ge_0.9@1": 0.05}}
    got = bench.headline(per_stage)
    assert got["fvu"] == {"metric": "fvu@3", "value": 0.2}
    assert got["frac_topic_auroc_ge_0.9"] == {"metric": "frac_topic_auroc_ge_0.9@1", "value": 0.05}
    assert bench.headline({"evaluate": {}}) == {}


def test_plot_writes_png(bench: ModuleType, tmp_path: Path) -> None:
    rows = [{"train_tokens": n, "headline": {"fvu": {"metric": "fvu@3", "value": v}}}
            for n, v in ((1000, 0.3), (4000, 0.2))]
    out = tmp_path / "scaling.png"
    bench.plot(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
