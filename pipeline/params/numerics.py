"""Params of the numerics every compute stage runs with: the portable (cross-machine) path and threads.

Left alone (``portable: false``), each stage picks what is fastest on the machine it runs on —
``train.dtype``/``interpret.encode_dtype`` ``auto`` use bf16 where the CPU has AMX/AVX512-BF16,
MKL and ATen pick their kernels for the CPU's ISA, torch uses one thread per core — so a result is
bit-exact on the same machine only. ``portable: true`` trades speed for results that a different
machine reproduces (README, "Reproducibility"). Every choice, resolved, is recorded in the
``environment`` block of each ``metrics/<stage>.json`` (:mod:`pipeline.environment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.params.core import knob

# What ``portable: true`` forces, as (params key, value): every compute dtype float32, the dense
# PyTorch training step (Triton kernels use bf16 matmuls and atomics).
PORTABLE_OVERRIDES = (("model.dtype", "float32"), ("train.dtype", "float32"), ("train.kernels", "torch"),
                      ("interpret.encode_dtype", "float32"))


@dataclass
class NumericsParams:
    portable: bool = knob(
        False, help="Force the portable path so another machine reproduces the numbers: float32 everywhere (overrides "
        "model.dtype, train.dtype, interpret.encode_dtype; train.kernels torch), fixed threads (see threads), "
        "deterministic algorithms, MKL's COMPATIBLE code path and ATen's baseline (non-AVX) kernels. Set it in "
        "params.yaml or with `sae <stage> --set numerics.portable=true`: the `sae` command reads it before torch "
        "starts. Slower (README, 'Reproducibility').")
    threads: int | None = knob(
        None, help="torch intra-op CPU threads (CPU reductions split their work by thread, so the count changes the "
        "rounding). null: torch's default (one per core), or 1 under portable.", ge=1)


def apply_portable(params: Any) -> list[str]:
    """With ``params.numerics.portable``, set every :data:`PORTABLE_OVERRIDES` key on ``params`` (a
    :class:`pipeline.params.Params`); return ``"key: old -> new"`` for each value that changed."""
    if not params.numerics.portable:
        return []
    changed = []
    for key, value in PORTABLE_OVERRIDES:
        section, name = key.split(".")
        old = getattr(getattr(params, section), name)
        if old != value:
            setattr(getattr(params, section), name, value)
            changed.append(f"{key}: {old} -> {value}")
    return changed
