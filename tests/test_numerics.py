"""Bit-repeatable CPU numerics in `sae` processes: MKL's reproducible mode and oneDNN's ISA cap (pipeline/numerics.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.environment import cpu_flags
from pipeline.numerics import (
    MKL_CBWR,
    ONEDNN_MAX_CPU_ISA,
    mkl_cbwr_mode,
    onednn_isa,
    request_reproducible_blas,
)

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


# The same in bf16, at the widths where oneDNN's AMX matmul kernels change their blocking (hence the
# summation order) with the thread count: a one-layer Llama with the default model's widths (d_model
# 576, MLP 1536) on 8 x 128 tokens, as `sae evaluate`'s forwards, and a 64 x 4096 @ 4096 x 576 product.
# argv[1] == "portable": start as `sae` does under numerics.portable (oneDNN capped below AMX).
PROBE_BF16 = r"""
import hashlib, json, sys
from pipeline.numerics import request_reproducible_blas
request_reproducible_blas(portable=sys.argv[1] == "portable")
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                  num_attention_heads=9, num_key_value_heads=3)
model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
ids = torch.randint(0, 512, (8, 128))
x, w = torch.randn(64, 4096).bfloat16(), torch.randn(4096, 576).bfloat16()
digests = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    with torch.no_grad():
        out = [model(input_ids=ids).logits, x @ w]
    digests.append([hashlib.sha256(t.float().numpy().tobytes()).hexdigest() for t in out])
print(json.dumps({"digests": digests}))
"""
_AMX_SKIP = pytest.mark.skipif("amx_bf16" not in cpu_flags(), reason="the CPU has no AMX (amx_bf16): oneDNN's AMX "
                                "kernels, whose blocking depends on the thread count, cannot run here")


def _bf16_digests(mode: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", PROBE_BF16, mode], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["digests"]


@_AMX_SKIP
def test_portable_bf16_forward_does_not_depend_on_threads_on_amx() -> None:
    one, two = _bf16_digests("portable")
    assert one[0] == two[0], "bf16 logits differ between 1 and 2 intra-op threads"
    assert one[1] == two[1], "bf16 64x4096 @ 4096x576 differs between 1 and 2 intra-op threads"


@_AMX_SKIP
def test_default_bf16_forward_repeats_at_each_thread_count_on_amx() -> None:
    # The default path keeps AMX (4.5x faster bf16 forwards): its bits depend on the thread count, which
    # every resume fingerprint holds, and repeat process to process at each count.
    first, second = _bf16_digests("default"), _bf16_digests("default")
    assert first == second


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


def test_onednn_isa_is_the_cpus_best_up_to_the_cap() -> None:
    avx512 = {"sse4_1", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    amx = avx512 | {"avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}
    assert onednn_isa(amx, {}) == "AVX10_1_512_AMX"
    assert onednn_isa(amx, {"ONEDNN_MAX_CPU_ISA": ONEDNN_MAX_CPU_ISA}) == "AVX512_CORE_BF16"
    assert onednn_isa(amx, {"DNNL_MAX_CPU_ISA": "avx512_core_amx"}) == "AVX10_1_512_AMX"  # old name, lower case
    assert onednn_isa(avx512, {"ONEDNN_MAX_CPU_ISA": ONEDNN_MAX_CPU_ISA}) == "AVX512_CORE_VNNI"  # a cap is no floor
    assert onednn_isa({"sse4_1", "avx", "avx2"}, {}) == "AVX2"
    assert onednn_isa(amx, {"ONEDNN_MAX_CPU_ISA": "NO_SUCH_ISA"}) == onednn_isa({"asimd"}, {}) == "unknown"


@pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="no AVX512-BF16: bf16 matmuls do not run in oneDNN here")
def test_recorded_onednn_isa_is_the_one_its_kernels_ran() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    code = ("import stages.cli, torch; x = torch.ones(64, 64, dtype=torch.bfloat16); x @ x; "
            "from pipeline.environment import environment; print('isa=' + environment()['onednn_isa'])")
    res = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_VERBOSE": "1"}, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    isa = res.stdout.split("isa=")[-1].strip()
    assert isa == onednn_isa(cpu_flags(), {})  # the default path leaves oneDNN uncapped
    assert f"brg_matmul:{isa.lower()}," in res.stdout
