"""Compile every Triton kernel for a CUDA target without a GPU: ``python -m pipeline.kernels.compile_check``.

The CPU tests run the kernels under the Triton interpreter, which accepts code that the real compiler rejects
(loop-carried type changes, unsupported ops in ``while`` conditions, ...). This check lowers each kernel through
Triton's full pipeline (TTIR → TTGIR → LLVM → PTX → cubin with the ``ptxas`` bundled in the Triton wheel) for
sm_90 (H100), with the dtypes and block sizes the training step uses. It needs no driver; it must run in a
process where ``TRITON_INTERPRET`` is unset.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def _cases() -> dict[str, tuple[Any, dict[str, str], dict[str, Any]]]:
    from pipeline.kernels import decoder_norm as dn
    from pipeline.kernels import triton_sparse as ts

    c = "constexpr"
    gather = {"K": "i32", "D": "i32", "stride_wr": "i32", "stride_wc": "i32"}
    fused = {"N": "i32", "D": "i32", "L": "i32", "K": "i32", "stride_xn": "i32", "stride_xd": "i32",
             "stride_wd": "i32", "stride_wl": "i32", "IEEE": c, "BLOCK_M": c, "BLOCK_L": c, "BLOCK_DK": c, "BLOCK_K": c}
    fused_bf16 = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "val_ptr": "*fp32", "idx_ptr": "*i64"}
    fused_fp32 = {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i64"}
    blocks = {"BLOCK_M": 64, "BLOCK_L": 128, "BLOCK_DK": 32, "BLOCK_K": 32}
    cases: dict[str, tuple[Any, dict[str, str], dict[str, Any]]] = {
        "gather_rows": (ts._gather_rows_kernel,
                        {"idx_ptr": "*i64", "val_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*fp32", "out_ptr": "*fp32",
                         **gather, "HAS_BIAS": c, "BLOCK_K": c, "BLOCK_D": c},
                        {"HAS_BIAS": True, "BLOCK_K": 32, "BLOCK_D": 128}),
        "gather_dot": (ts._gather_dot_kernel,
                       {"idx_ptr": "*i64", "g_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16", **gather,
                        "BLOCK_K": c, "BLOCK_D": c},
                       {"BLOCK_K": 64, "BLOCK_D": 64}),
        "segment_outer": (ts._segment_outer_kernel,
                          {"offsets_ptr": "*i64", "rows_ptr": "*i64", "coef_ptr": "*fp32", "g_ptr": "*bf16",
                           "out_ptr": "*bf16", "sum_ptr": "*fp32", "D": "i32", "stride_or": "i32", "stride_oc": "i32",
                           "HAS_SUM": c, "BLOCK_E": c, "BLOCK_D": c},
                          {"HAS_SUM": True, "BLOCK_E": ts.BLOCK_E, "BLOCK_D": ts.BLOCK_D}),
        "fused_topk_bf16": (ts._fused_topk_kernel, {**fused_bf16, **fused}, {"IEEE": False, **blocks}),
        "fused_topk_fp32": (ts._fused_topk_kernel, {**fused_fp32, **fused}, {"IEEE": True, **blocks}),
    }
    # Decoder-norm kernels on fp32 master weights: one-block rows (d_in <= BLOCK_D) and the looped variant.
    rows = {"R": "i32", "D": "i32", "stride_wr": "i32", "stride_wc": "i32", "BLOCK_R": c, "BLOCK_D": c, "ONE_BLOCK": c}
    grad = {"g_ptr": "*fp32", "stride_gr": "i32", "stride_gc": "i32"}
    for one in (True, False):
        bl = {"BLOCK_R": 4, "BLOCK_D": 1024, "ONE_BLOCK": True} if one else {"BLOCK_R": 2, "BLOCK_D": 2048, "ONE_BLOCK": False}
        tag = "one_block" if one else "looped"
        cases[f"decoder_project_{tag}"] = (dn._project_out_kernel, {"w_ptr": "*fp32", **grad, **rows}, bl)
        cases[f"decoder_normalize_{tag}"] = (dn._normalize_rows_kernel, {"w_ptr": "*fp32", "eps": "fp32", **rows}, bl)
    return cases


def compile_all(arch: int = 90) -> dict[str, str]:
    """Compile each kernel for ``sm_<arch>``; returns ``{name: "ok" | "<error>"}``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels this check compiles")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results: dict[str, str] = {}
    for name, (fn, signature, constexprs) in _cases().items():
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target)
            results[name] = "ok" if compiled.asm.get("cubin") else "no cubin produced"
        except Exception as e:  # report every kernel, not only the first failure
            results[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return results


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    for name, status in results.items():
        log.info("%-16s %s", name, status)
    return 0 if all(s == "ok" for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
