"""Params of the SAE stages: architecture, training loop, evaluation. (Owned by the train/evaluate work.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.core import knob

Arch = Literal["relu_l1", "topk", "batchtopk", "jumprelu", "gated", "kl", "dense"]


@dataclass
class SAEParams:
    arch: Arch = knob("topk", help="SAE architecture.")
    expansion: int = knob(8, help="d_sae = expansion * d_model (ignored by 'dense').", ge=1)
    k: int = knob(32, help="Active latents per token for topk/batchtopk.", ge=1)


@dataclass
class TrainParams:
    device: str = knob("auto", help="'auto' (cuda if present, else cpu), 'cpu', 'cuda', ...")
    batch_size: int = knob(4096, help="Tokens per optimizer step.", ge=1)
    lr: float = knob(4e-4, help="Peak learning rate.", gt=0)
    n_tokens: int | None = knob(None, help="Training tokens (null: one pass over the training split).", ge=1)


@dataclass
class EvaluateParams:
    n_tokens: int | None = knob(None, help="Validation tokens used for reconstruction metrics (null: all).", ge=1)
