"""Bit-repeatable CPU numerics: Intel MKL's conditional numerical reproducibility (CNR).

PyTorch's CPU wheels do their float32 GEMMs in MKL. Left to itself, MKL picks its code path at run
time (how many threads to use inside an OpenMP region, which kernel) and those choices change the
rounding: on this machine the CPU flash-attention kernel (``scaled_dot_product_attention``, whose
per-block GEMMs call MKL from inside an OpenMP parallel region) gave different bits with one and two
intra-op threads, and under CPU load the first forward of a process now and then took the other
path, which is what made ``metrics/steer.json`` differ in the 7th digit about one run in 25.
MKL's CNR mode ``AUTO,STRICT`` fixes the code path for the CPU and makes GEMM results independent
of the number of threads (Intel oneMKL developer guide, "Obtaining Numerically Reproducible
Results"). It must be chosen before MKL's first call, i.e. before ``torch`` is imported, which is
why the ``sae`` console script calls :func:`request_reproducible_blas` first thing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["MKL_CBWR", "request_reproducible_blas", "mkl_cbwr_mode"]

#: The CNR mode the pipeline runs with unless ``MKL_CBWR`` is already set (then the user's wins).
MKL_CBWR = "AUTO,STRICT"

# Bits of MKL's CNR mode word (mkl_cbwr.h): the code branch in the low byte, STRICT as a flag.
_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
             9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_STRICT = 0x10000


def request_reproducible_blas(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask MKL for reproducible results in this process (and the processes it starts).

    Sets ``MKL_CBWR`` to :data:`MKL_CBWR` unless it is set already. Returns False when ``torch``
    is already imported: MKL may have read its settings, so this process keeps whatever it has
    (:func:`mkl_cbwr_mode` tells which).
    """
    env = os.environ if environ is None else environ
    env.setdefault("MKL_CBWR", MKL_CBWR)
    return "torch" not in sys.modules


def mkl_cbwr_mode() -> str | None:
    """The CNR mode MKL runs with in this process, e.g. ``"AUTO,STRICT"``; None without MKL.

    Reads MKL's own state, not the environment, so a process that imported torch before
    :func:`request_reproducible_blas` reports what it really runs with ("OFF": not reproducible).
    """
    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:  # MKL is linked statically into libtorch_cpu; its CNR getter is exported there.
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        getter = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "unknown"
    getter.restype, getter.argtypes = ctypes.c_int, [ctypes.c_int]
    word = int(getter(-1))  # -1: the whole mode word
    name = _BRANCHES.get(word & 0xFF, hex(word & 0xFF))
    return f"{name},STRICT" if word & _STRICT else name
