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

MKL's CNR mode does not govern oneDNN, which does PyTorch's bfloat16 matmuls on CPUs with native bf16.
On a CPU with AMX its AMX matmul kernel (``brg_matmul:avx10_1_512_amx``) picks its blocking from
the thread count, so 10 of 90 common shapes (e.g. 1024 x 576 @ 576 x 1536, the default model's MLP
on 8 x 128 tokens) gave different bits with one and two threads; its AVX512-BF16 kernel gave the same
bits for every shape and thread count tried. Capping oneDNN there (:data:`ONEDNN_MAX_CPU_ISA`) costs
~4.5x on bf16 forwards and 5-6x on bf16 GEMMs of an AMX CPU, so the default path keeps AMX: a run's
thread count is fixed on a machine (``numerics.threads``), recorded with the ISA in every resume
fingerprint and environment block, so bits repeat run to run and a run with another thread count is
never mixed with this one's shards or checkpoint. The portable path caps oneDNN (README,
"Reproducibility"); so does exporting ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` before ``sae`` starts.
oneDNN reads the cap at its first use, so it is set with ``MKL_CBWR``.

The portable path (``numerics.portable``) goes further, so that *another* machine gets the same bits:
MKL's ``COMPATIBLE`` branch (one SSE2-level code path on every x86 CPU, Intel or AMD), ATen's
baseline kernels (vectorised reductions sum in a different order on AVX2 and AVX512 CPUs), a fixed
thread count (ATen splits a reduction by thread), deterministic algorithms, no TF32. The first two
are read by the libraries at start-up, so the ``sae`` command reads the one params key before torch
is imported (:func:`portable_requested`); :func:`apply_numerics` sets the rest at stage start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "PORTABLE_ENV", "request_reproducible_blas", "mkl_cbwr_mode",
           "portable_requested", "onednn_isa", "apply_numerics", "numerics_fingerprint", "child_environ"]

log = logging.getLogger(__name__)

#: The CNR mode the pipeline runs with unless ``MKL_CBWR`` is already set (then the user's wins).
MKL_CBWR = "AUTO,STRICT"
#: The highest instruction set oneDNN may use on the portable path (its ``ONEDNN_MAX_CPU_ISA``; x86 only):
#: AVX512-BF16, not AMX, whose kernels' summation order depends on the number of threads (module docstring).
ONEDNN_MAX_CPU_ISA = "AVX512_CORE_BF16"
#: Start-up settings of the portable path (each kept if the user set it): MKL's vendor-neutral branch,
#: strict so that it does not depend on the thread count either; ATen's non-vectorised kernels
#: (``torch.backends.cpu.get_cpu_capability()`` then says DEFAULT); deterministic cuBLAS (PyTorch's
#: "Reproducibility" notes: needed by ``torch.use_deterministic_algorithms`` on CUDA >= 10.2); on x86 the
#: oneDNN cap (bf16 matmuls that do not depend on the thread count).
# oneDNN's ISA names are x86 ones; elsewhere (Arm) the variable is not set.
_ONEDNN_CAP = {"ONEDNN_MAX_CPU_ISA": ONEDNN_MAX_CPU_ISA} if platform.machine().lower() in ("x86_64", "amd64") else {}
PORTABLE_ENV = {"MKL_CBWR": "COMPATIBLE,STRICT", "ATEN_CPU_CAPABILITY": "default", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                **_ONEDNN_CAP}
# The values these variables had before this process changed them (child_environ restores them).
_BEFORE: dict[str, str | None] = {}

# Bits of MKL's CNR mode word (mkl_cbwr.h): the code branch in the low byte, STRICT as a flag.
_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
             9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_STRICT = 0x10000


def request_reproducible_blas(environ: MutableMapping[str, str] | None = None, portable: bool = False) -> bool:
    """Ask MKL for reproducible results in this process (and the processes it starts).

    Sets ``MKL_CBWR`` to :data:`MKL_CBWR` (with ``portable``: every :data:`PORTABLE_ENV` variable, which on
    x86 includes the oneDNN cap), each unless it is set already. Returns
    False when ``torch`` is already imported: MKL and oneDNN may have read their settings, so this
    process keeps whatever it has (:func:`mkl_cbwr_mode` tells which).
    """
    env = os.environ if environ is None else environ
    wanted = PORTABLE_ENV if portable else {"MKL_CBWR": MKL_CBWR}
    for key, value in wanted.items():
        if environ is None:
            _BEFORE.setdefault(key, env.get(key))
        env.setdefault(key, value)
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


# oneDNN's x86 instruction sets, lowest first, each with the /proc/cpuinfo flags it needs (oneDNN's names,
# as ONEDNN_MAX_CPU_ISA spells them; AVX10_1_512 is AVX512_CORE_FP16, AVX10_1_512_AMX is AVX512_CORE_AMX).
_ONEDNN_ISAS = (("SSE41", ("sse4_1",)), ("AVX", ("avx",)), ("AVX2", ("avx2",)),
                ("AVX512_CORE", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
                ("AVX512_CORE_VNNI", ("avx512_vnni",)), ("AVX512_CORE_BF16", ("avx512_bf16",)),
                ("AVX10_1_512", ("avx512_fp16",)), ("AVX10_1_512_AMX", ("amx_tile", "amx_bf16", "amx_int8")))
_ONEDNN_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX"}


def onednn_isa(flags: Collection[str], environ: Mapping[str, str] | None = None) -> str:
    """The instruction set oneDNN's kernels use here, e.g. ``"AVX512_CORE_BF16"``: the highest one the CPU's
    ``flags`` support, at most the ``ONEDNN_MAX_CPU_ISA`` cap in ``environ`` (``os.environ``; oneDNN read it at
    its first use); ``"unknown"`` off x86 or for a cap this table does not know. oneDNN exports no getter
    for it, hence the derivation; ``ONEDNN_VERBOSE=1`` shows it in each kernel's name (``brg_matmul:...``).
    """
    env = os.environ if environ is None else environ
    cap = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    cap = _ONEDNN_ALIASES.get(cap, cap)
    names = [name for name, _ in _ONEDNN_ISAS]
    if cap != "ALL" and cap not in names:
        return "unknown"
    best = "unknown"
    for name, needs in _ONEDNN_ISAS:  # each level needs the flags of every level below it too
        if not set(needs) <= set(flags):
            break
        best = name
        if name == cap:
            break
    return best


def portable_requested(argv: Sequence[str]) -> bool:
    """Whether a ``sae`` command line asks for ``numerics.portable``: its ``--set numerics.portable=...``,
    else the value in its ``--params`` file (default ``params.yaml``).

    Read before torch is imported, with nothing but YAML; anything unreadable counts as False here
    and is reported by the stage's own params loading, which also applies the portable dtypes.
    """
    path, value = "params.yaml", None
    for i, arg in enumerate(argv):
        for opt in ("--params", "--set"):
            if arg == opt and i + 1 < len(argv):
                given = argv[i + 1]
            elif arg.startswith(opt + "="):
                given = arg[len(opt) + 1:]
            else:
                continue
            key, _, raw = given.partition("=")
            if opt == "--params":
                path = given
            elif key.strip() == "numerics.portable":
                value = raw
    try:
        import yaml

        if value is not None:
            return yaml.safe_load(value) is True
        return yaml.safe_load(Path(path).read_text())["numerics"]["portable"] is True
    except Exception:  # no file, no section, bad YAML: the stage's load_params says what is wrong
        return False


def apply_numerics(portable: bool, threads: int | None) -> None:
    """At stage start: the thread count, deterministic algorithms and (portable) no TF32, in this process.

    ``threads``: torch's intra-op threads (None: left at torch's default, one per core; 1 when
    ``portable``). Warns when ``portable`` but MKL or ATen already started in their fast modes (torch
    was imported before :func:`request_reproducible_blas`, e.g. not through the ``sae`` command): the
    run is then not portable, and the recorded environment (:mod:`pipeline.environment`) says so.
    """
    import torch

    n = threads if threads is not None else (1 if portable else None)
    if n is not None:
        torch.set_num_threads(n)
    # warn_only: an op without a deterministic implementation (some CUDA scatter/index_add) logs a
    # warning instead of stopping the stage; every op that has one uses it.
    torch.use_deterministic_algorithms(portable, warn_only=True)
    torch.backends.cudnn.deterministic = portable
    if not portable:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", PORTABLE_ENV["CUBLAS_WORKSPACE_CONFIG"])  # before cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    mode, capability = mkl_cbwr_mode(), torch.backends.cpu.get_cpu_capability()
    if mode not in (None, PORTABLE_ENV["MKL_CBWR"]) or capability != "DEFAULT":
        log.warning("numerics.portable: MKL runs %s and ATen %s kernels, not %s and DEFAULT (torch started before "
                    "the portable settings; run through the `sae` command or export %s): results are not portable",
                    mode, capability, PORTABLE_ENV["MKL_CBWR"],
                    " ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items() if k != "CUBLAS_WORKSPACE_CONFIG"))


def numerics_fingerprint(device: Any) -> dict[str, Any]:
    """The numerics in force in this process that change a computation's bits on ``device`` (a torch device or
    its name): part of every resume fingerprint (extract's job digest, the training checkpoint), so that a run
    started under other numerics (``numerics.portable`` switched, another ``numerics.threads``) is redone rather
    than continued.

    Read from the libraries, as :func:`pipeline.environment.environment` does, so a setting made outside params
    (``OMP_NUM_THREADS``, ``MKL_CBWR``, ``ATEN_CPU_CAPABILITY``) counts too: deterministic algorithms everywhere;
    on CPU the intra-op thread count (ATen splits a reduction by thread), MKL's CNR mode, ATen's kernel set and
    oneDNN; on CUDA TF32. A setting :func:`apply_numerics` gains that changes bits belongs here too.
    """
    import torch

    fp: dict[str, Any] = {"deterministic": torch.are_deterministic_algorithms_enabled()}
    kind = torch.device(device).type
    if kind == "cpu":
        fp.update(threads=torch.get_num_threads(), mkl_cbwr=mkl_cbwr_mode(),
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), mkldnn=torch.backends.mkldnn.enabled,
                  onednn_isa=onednn_isa(_cpu_flags()))
    elif kind == "cuda":
        fp.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                  float32_matmul_precision=torch.get_float32_matmul_precision())
    return fp


def _cpu_flags() -> frozenset[str]:
    from pipeline.environment import cpu_flags  # which imports this module

    return cpu_flags()


def child_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` as it was before :func:`request_reproducible_blas` changed it: for a child ``sae``
    process, which chooses its own numerics from its own params (``sae verify`` runs ``dvc repro``)."""
    env = dict(os.environ if environ is None else environ)
    for key, before in _BEFORE.items():
        if before is None:
            env.pop(key, None)
        else:
            env[key] = before
    return env
