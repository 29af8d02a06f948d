"""Progress off a terminal: a stage run with stderr to a file (as under `dvc repro`) logs a line at a
steady interval with the stage, done/total, tok/s and ETA."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import env as e2e_env

from pipeline.progress import Progress, format_count, format_duration, interval_s
from pipeline.synthetic import write_synthetic_activations

HOOK = "layers.2.resid_post"
LINE = re.compile(r"sae\.progress: train layers\.2\.resid_post: ([\d,]+)/([\d,]+) steps \((\d+)%\), "
                  r"([\d.]+[kMG]?) tok/s, (ETA \S+|done in \S+)")


def test_formats() -> None:
    assert [format_duration(s) for s in (9.4, 75, 3725)] == ["9s", "1m15s", "1h02m"]
    assert [format_count(x) for x in (3.214, 15123.4, 2.5e6)] == ["3.21", "15.1k", "2.5M"]


def test_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_PROGRESS_INTERVAL", "0.5")
    assert interval_s() == 0.5
    for bad in ("x", "0", "-3"):
        monkeypatch.setenv("SAE_PROGRESS_INTERVAL", bad)
        assert interval_s() == 15.0


def test_lines_at_an_interval_even_while_the_loop_is_stuck(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sae.progress")
    with Progress("extract", 1000, unit="tok", terminal=False, interval=0.05) as p:
        p.update(250)
        time.sleep(0.4)  # one slow step: the stage still speaks
        p.set_postfix(loss="1.5")
    lines = [r.getMessage() for r in caplog.records if r.name == "sae.progress"]
    assert len(lines) >= 3, lines
    assert re.fullmatch(r"extract: 250/1,000 tok \(25%\), \S+ tok/s, ETA \S+", lines[0]), lines[0]
    assert re.fullmatch(r"extract: 250/1,000 tok \(25%\), \S+ tok/s, done in 0s, loss=1\.5", lines[-1]), lines[-1]


def test_units_other_than_tokens(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sae.progress")
    with Progress("steer", 3, unit="features", tokens_per_unit=None, terminal=False, interval=60) as p:
        p.update(3)
    with Progress("train h", 8, unit="steps", initial=4, tokens_per_unit=1024, terminal=False, interval=60) as p:
        p.update(4)
    lines = [r.getMessage() for r in caplog.records if r.name == "sae.progress"]
    assert re.fullmatch(r"steer: 3/3 features \(100%\), \S+ features/s, done in \S+", lines[0]), lines
    assert re.fullmatch(r"train h: 8/8 steps \(100%\), \S+ tok/s, done in \S+", lines[1]), lines  # rate: 4 steps, not 8


def test_disabled_and_failing_loops_are_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sae.progress")
    with Progress("rank 1", 10, enabled=False, interval=0.01) as p:
        p.update(10)
        time.sleep(0.05)
    with pytest.raises(RuntimeError), Progress("boom", 10, terminal=False, interval=60):
        raise RuntimeError
    assert not [r for r in caplog.records if r.name == "sae.progress"]


def test_a_progress_left_open_by_a_failed_loop_goes_quiet(caplog: pytest.LogCaptureFixture) -> None:
    import gc

    caplog.set_level(logging.INFO, logger="sae.progress")

    def loop() -> None:
        p = Progress("leaky", 10, terminal=False, interval=0.02)  # no `with`, no close(): the loop raises
        p.update(1)
        raise RuntimeError

    with pytest.raises(RuntimeError):
        loop()
    gc.collect()
    time.sleep(0.1)
    n = len(caplog.records)
    time.sleep(0.2)
    assert len(caplog.records) == n  # its thread saw the Progress collected and stopped


def test_train_stage_with_stderr_to_a_file_logs_progress(tmp_path: Path) -> None:
    """`sae train` as DVC runs it (stderr a file, not a terminal): progress lines at the set interval."""
    from pipeline.params import Params, to_dict

    for split, n, sample in (("train", 4096, 0), ("validation", 512, 1)):
        write_synthetic_activations(tmp_path / "data/activations" / split / HOOK, n, 16, n_features=24, k_true=2,
                                    seed=4, sample_seed=sample, hook=HOOK, dtype="float16", shard_rows=1024, split=split)
    import yaml

    p = to_dict(Params())
    p["extract"]["hooks"] = [HOOK]
    p["sae"].update(arch="topk", expansion=4, k=4)
    p["train"].update(device="cpu", dtype="float32", batch_size=32, n_tokens=32 * 600, log_every=8, val_every=0,
                      val_tokens=256, checkpoint_every=0, dead_window_tokens=1024)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {**e2e_env(), "SAE_LOG_LEVEL": "INFO", "SAE_PROGRESS_INTERVAL": "0.05"}
    sae = Path(sys.executable).parent / "sae"
    with open(tmp_path / "stderr.log", "w") as err:
        res = subprocess.run([str(sae), "train"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    text = (tmp_path / "stderr.log").read_text()
    assert res.returncode == 0, text[-3000:]
    found = [LINE.search(line) for line in text.splitlines()]
    matches = [m for m in found if m]
    assert len(matches) >= 2, text[-3000:]
    assert matches[-1].group(5).startswith("done in") and matches[-1].group(1) == "600"
    assert all(m.group(5).startswith("ETA") for m in matches[:-1])
    assert "\r" not in text  # no tqdm bar redraws in the file
    assert os.path.getsize(tmp_path / "stderr.log") < 200_000
