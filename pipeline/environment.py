"""What a stage's numbers depend on besides params, data and code: the machine, the libraries, and
every ``auto`` choice as the stage resolved it.

Each compute stage writes :func:`environment` as the ``"environment"`` block of its
``results/<stage>.json``; the report stage copies the blocks into the MLflow run's tags; ``sae
verify`` compares them to tell whether a rerun must be bit-exact or within tolerance. All values are
strings (so the block is never mistaken for metrics) and a function of the machine and the settings
only: no time, process id or load, so a rerun on the same machine writes the same bytes.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.numerics import mkl_cbwr_mode, onednn_isa

__all__ = ["environment", "cpu_flags", "cpu_model", "cpu_has_fast_bf16", "KEY"]

KEY = "environment"  # the block's key in results/<stage>.json
# CPU features that select different kernels (and so roundings) in MKL, oneDNN and ATen: vector
# width, FMA, native bf16/fp16/int8 dot products and AMX tiles (x86); NEON/SVE/bf16 (Arm).
RELEVANT_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16")
# Libraries whose kernels or tokenisation produce the numbers (DVC, MLflow and friends do not).
LIBRARIES = ("torch", "numpy", "transformers", "tokenizers", "triton")


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` ``flags``, or ``Features`` on Arm); empty off Linux."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    """``model name`` from ``/proc/cpuinfo`` (e.g. "AMD EPYC 9654 96-Core Processor"), else the platform's word."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16): there bf16 matmuls ran ~5x
    faster than fp32 (measured on the 2-core dev box: 196 vs 38 GFLOPS at 1024x576x4608). Elsewhere
    bf16 matmul is emulated and slower than fp32. The one test behind every ``auto`` dtype."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def _gpu() -> dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": "none"}
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": f"{torch.cuda.get_device_name()} (sm_{major}{minor}) x{torch.cuda.device_count()}",
            "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())}


def environment(resolved: Mapping[str, Any] | None = None, compute: bool = True) -> dict[str, str]:
    """The ``environment`` block: the stage's resolved choices (``{"train.dtype": "bfloat16", ...}``, named
    by their params key) plus the machine, the numerics settings in force and the library versions.

    Read from the libraries themselves (``mkl_cbwr``: MKL's own mode; ``cpu_capability``: the ATen
    kernel set; ``threads``, ``deterministic``: torch's state), so the record says what ran, not
    what was asked for; ``onednn_isa`` (oneDNN's kernels: the bf16 matmuls) is derived from the CPU's
    flags and the ``ONEDNN_MAX_CPU_ISA`` cap, oneDNN having no getter (:func:`pipeline.numerics.onednn_isa`). ``compute=False`` (a stage without floating-point work, e.g. tokenisation):
    the library versions only.
    """
    env = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in (resolved or {}).items()}
    env.update({"python": platform.python_version(), **{f"versions.{name}": _version(name) for name in LIBRARIES}})
    if not compute:
        return env
    import torch  # here, so that reading KEY or the CPU's flags does not start torch

    flags = cpu_flags()
    env.update({
        "cpu": cpu_model(),
        "cpu_flags": " ".join(f for f in RELEVANT_FLAGS if f in flags),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": mkl_cbwr_mode() or "none",
        "onednn_isa": onednn_isa(flags) if torch.backends.mkldnn.is_available() else "none",
        "threads": str(torch.get_num_threads()),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        **_gpu(),
    })
    return env
