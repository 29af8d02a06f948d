"""Bit-repeatable CPU numerics in `sae` processes: MKL's reproducible mode (pipeline/numerics.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.numerics import MKL_CBWR, mkl_cbwr_mode, request_reproducible_blas

# A fresh process that starts like the `sae` console script (stages.cli first), then runs the
# steer stage's first forward -- a left-padded batch through SDPA attention -- with MKL threaded
# two different ways. Before pipeline/numerics.py the two logits differed in their low bits, and
# which of the two a run got could depend on CPU load: the flaky steer metrics.
PROBE = r"""
import hashlib, json, sys
import stages.cli  # noqa: F401  (what `sae` imports first)
import torch
from transformers import AutoModelForCausalLM
from pipeline.numerics import mkl_cbwr_mode
from pipeline.steering.generate import _positions, left_pad

model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
g = torch.Generator().manual_seed(0)
batch = left_pad([torch.randint(0, 100, (n,), generator=g).tolist() for n in [5, 7, 11, 3] * 9], 0)
digests = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=_positions(batch.attention_mask)).logits
    digests.append(hashlib.sha256(logits.numpy().tobytes()).hexdigest())
print(json.dumps({"mode": mkl_cbwr_mode(), "digests": digests}))
"""


@pytest.mark.skipif(mkl_cbwr_mode() is None, reason="this torch build has no MKL")
def test_sae_process_forward_does_not_depend_on_mkl_threading(tiny_llama: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", PROBE, str(tiny_llama)], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["digests"][0] == out["digests"][1], "logits differ between 1 and 2 intra-op threads"
    assert out["mode"] == MKL_CBWR


def test_request_keeps_a_users_mode_and_says_when_too_late() -> None:
    env = {"MKL_CBWR": "COMPATIBLE"}
    request_reproducible_blas(env)
    assert env["MKL_CBWR"] == "COMPATIBLE"
    env = {}
    # torch is imported in the test process already: MKL may have started, so the call says so.
    assert request_reproducible_blas(env) is False and env["MKL_CBWR"] == MKL_CBWR


@pytest.mark.skipif(mkl_cbwr_mode() is None, reason="this torch build has no MKL")
@pytest.mark.parametrize(("variable", "expected"), [(None, "OFF"), ("COMPATIBLE", "COMPATIBLE"), ("AUTO,STRICT", "AUTO,STRICT")])
def test_mode_is_read_from_mkl_itself(variable: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if variable is not None:
        env["MKL_CBWR"] = variable
    code = "import torch; torch.ones(8, 8) @ torch.ones(8, 8); from pipeline.numerics import mkl_cbwr_mode; print(mkl_cbwr_mode())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.stdout.strip() == expected
