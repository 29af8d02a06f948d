"""How ``sae steer`` uses interpretation's ``features.parquet``: a missing file or missing columns, for which the
stage's own statistics stand in, say so in one warning line; a file that is not interpretation's output stops it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.errors import UserError
from pipeline.steering.baselines import feature_topics, read_interpret, select_features
from pipeline.steering.stats import FeatureStats


def _stats(topics: list[str]) -> FeatureStats:
    """3 features, 2 topics: feature 0 is topic a's, feature 1 topic b's (by the stage's own contrast)."""
    n = len(topics)
    return FeatureStats(n_tokens=8, max_act=np.array([4.0, 3.0, 1.0]), fire_count=np.array([4, 4, 8]),
                        mean=np.array([1.5, 1.0, 1.0]), std=np.array([1.0, 1.0, 0.1]), topics=topics,
                        topic_tokens=np.array([4, 4][:n]), topic_mean=np.array([[3.0, 0, 1], [0, 2.0, 1]])[:n],
                        resid_topic_mean=np.zeros((n, 3)), resid_mean=np.zeros(3), context_ids=np.array([10, 11]),
                        context_max=np.array([[4.0, 0, 1], [0, 3.0, 1]]))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_missing_interpretation_is_a_one_line_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Before: an INFO line, not shown by default, while feature selection silently used other statistics.
    path = tmp_path / "features.parquet"
    with caplog.at_level(logging.INFO):
        assert read_interpret(path) is None
        assert select_features(_stats(["a", "b"]), None, [], 2, "topic", min_firing=1) == [0, 1]
    (line,) = _warnings(caplog)
    assert line.startswith(f"{path} not found (run `sae interpret` first)") and "own statistics" in line
    assert "\n" not in line


def test_interpretation_without_topic_columns_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    st = _stats(["a", "b"])
    full = pl.DataFrame({"feature": [0, 1, 2], "topic_auroc@1": [0.6, 0.9, 0.5], "best_topic": ["a", "b", "a"]})
    with caplog.at_level(logging.INFO):
        assert select_features(st, full, [], 1, "auroc", min_firing=1) == [1]
        assert select_features(st, full.drop("topic_auroc@1"), [2], 1, "topic", min_firing=1) == [2]  # listed
    assert _warnings(caplog) == []  # everything read is there
    with caplog.at_level(logging.INFO):
        assert select_features(st, full.drop("topic_auroc@1"), [], 2, "topic", min_firing=1) == [0, 1]
    (line,) = _warnings(caplog)
    assert line == ("steer: the interpretation output has no topic_auroc column: feature selection from this "
                    "stage's own statistics")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        no_topics = full.select("feature")
        assert select_features(st, no_topics, [0, 1], 2, "topic", min_firing=1) == [0, 1]
        assert feature_topics(st, no_topics, [0, 1]) == {0: "a", 1: "b"}
    assert _warnings(caplog) == ["steer: the interpretation output has no best_topic column: feature topics from "
                                 "this stage's own statistics"]
    caplog.clear()
    with caplog.at_level(logging.INFO):  # an unlabelled corpus has no topics to take from anywhere
        assert select_features(_stats([]), no_topics, [1], 2, "topic", min_firing=1) == [1]
    assert _warnings(caplog) == []


def test_a_file_that_is_not_interpretation_output_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "features.parquet"
    pl.DataFrame({"latent": [0, 1]}).write_parquet(path)
    with pytest.raises(UserError, match=r"features.parquet: no 'feature' column, not written by `sae interpret`"):
        read_interpret(path)
