"""What a training run decides before its first step: the ``auto`` dtype and kernels, the learning-rate
schedule, the optimizer, the resume fingerprint and the data-dependent initialisation. Used by
:func:`pipeline.train.train_sae` (and by the stage, which records the resolved choices).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from pipeline import distributed
from pipeline.activations import ActivationBatch, ActivationDataset
from pipeline.checkpoint import fingerprint
from pipeline.devices import resolve_device
from pipeline.environment import cpu_has_fast_bf16
from pipeline.errors import UserError
from pipeline.kernels import resolve_backend
from pipeline.lanes import STREAM_VERSION
from pipeline.numerics import numerics_fingerprint
from pipeline.pairs import split
from pipeline.params.sae import TrainParams
from pipeline.sae import SAE, SAEConfig

# Params that cannot change the trained weights: excluded from the resume fingerprint.
# The number of processes is checked on its own (pipeline.checkpoint: "written by a run of N processes").
NOT_FINGERPRINTED = ("device", "log_every", "val_every", "val_tokens", "checkpoint_every", "prefetch", "processes")


KERNEL_ARCHS = ("topk", "batchtopk")  # the architectures pipeline.kernels implements


def kernel_backend(choice: str, arch: str, device: torch.device) -> str:
    """``train.kernels`` -> the SAE's ``kernel_backend``. 'auto' for topk/batchtopk: the Triton sparse kernels on
    CUDA, the plain-PyTorch sparse step on CPU (several times the dense step's tokens/s: benchmarks/README.md)."""
    if arch not in KERNEL_ARCHS:
        if choice in ("triton", "sparse"):
            raise UserError(f"train.kernels: {choice!r} supports sae.arch {' and '.join(KERNEL_ARCHS)}, not {arch!r}")
        return "torch"
    if choice == "sparse":
        return "sparse"
    try:
        resolved = resolve_backend(choice, device)  # type: ignore[arg-type]
    except UserError as e:
        raise UserError(f"train.kernels: {e}") from None
    return "sparse" if choice == "auto" and resolved == "torch" and device.type == "cpu" else resolved


def use_bf16_autocast(dtype: str, device: torch.device) -> bool:
    """``train.dtype``: 'auto' is bf16 autocast on CUDA and on CPUs with native bf16, else float32."""
    if dtype == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return dtype == "bfloat16"


def resolve_auto(cfg: TrainParams, arch: str) -> TrainParams:
    """``cfg`` with ``dtype`` and ``kernels`` 'auto' decided for this machine (the stage records them, and the
    trainer, its checkpoint fingerprint and ``cfg.json`` then use exactly these)."""
    device = resolve_device(cfg.device)
    # Latent shards train on the dense step (pipeline.sharding_step): known here once the processes have joined
    # (sae train joins first); pipeline.train_loop decides it again for callers that join later.
    sharded = cfg.parallel == "latents" and cfg.kernels == "auto" and distributed.current().parallel
    return dataclasses.replace(cfg, dtype="bfloat16" if use_bf16_autocast(cfg.dtype, device) else "float32",
                               kernels="torch" if sharded else kernel_backend(cfg.kernels, arch, device))


def lr_at(step: int, total_steps: int, cfg: TrainParams) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then constant / linear / cosine decay to 0.

    A pure function of the step, so the step is the whole scheduler state. The linear decay over
    the final 20% of training follows Bricken et al. (2023) / Anthropic's April 2024 update.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.decay == "linear":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        return cfg.lr * min(1.0, (total_steps - step) / decay_steps)
    if cfg.decay == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def make_optimizer(sae: SAE, cfg: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """Adam(W) over the fp32 masters, fused: one pass per parameter (on CPU ~3x the default foreach step, whose
    many small parallel ops also suffer most when other processes share the cores); elementwise, so deterministic."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    beta1, beta2 = cfg.betas
    fused = device.type in ("cuda", "cpu")
    return cls(sae.parameters(), lr=cfg.lr, betas=(beta1, beta2), weight_decay=cfg.weight_decay, fused=fused or None)


def _data_identity(dataset: ActivationDataset) -> dict[str, object]:
    m = dataset.manifest
    return {"n_tokens": m.n_tokens, "d_model": m.d_model, "hook": m.hook, "dtype": m.dtype,
            "shards": [s.sha256 for s in m.shards], "stream": STREAM_VERSION}


def train_fingerprint(sae_cfg: SAEConfig, cfg: TrainParams, seed: int, dataset: ActivationDataset,
                      device: torch.device, target: ActivationDataset | None = None) -> dict[str, str]:
    """Every input that changes the trained weights: SAE config, loop params, seed, data identity (and a
    transcoder's target data), and the numerics in force on ``device`` (``numerics.portable``, threads, ...:
    :func:`pipeline.numerics.numerics_fingerprint`)."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    if train.get("parallel") == "data":  # the default, named only when latents: earlier checkpoints still resume
        del train["parallel"]
    data = _data_identity(dataset)
    if target is not None:  # only then: an SAE's fingerprint, hence its checkpoints, stay what they were
        data["target"] = _data_identity(target)
    return fingerprint(sae=sae_cfg.to_dict(), train=train, seed=seed, data=data, numerics=numerics_fingerprint(device))


def init_from_first_batch(sae: SAE, first: ActivationBatch, dataset: ActivationDataset, device: torch.device,
                          paired: bool = False) -> None:
    """``sae.init_from_data`` on the step-0 batch (``first.acts [B, d_model]``, or ``[B, 2·d_model]`` input then
    target columns when ``paired``: a transcoder's); bad data names the dataset and step."""
    x = first.acts.to(device)
    bad = ~torch.isfinite(x).all(dim=1)  # [B]
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise UserError(f"{dataset.root}: non-finite activations (NaN/inf) in the batch at step 0 (init_from_data), "
                        f"first at context_id {int(first.context_id[i])}, position {int(first.position[i])}")
    try:
        if paired:
            inputs, target = split(x, paired)
            sae.init_from_data(inputs, target_sample=target)  # type: ignore[call-arg]  (a transcoder's)
        else:
            sae.init_from_data(x)
    except UserError as e:
        raise UserError(f"{dataset.root}: the batch at step 0: {e}") from None


__all__ = ["KERNEL_ARCHS", "NOT_FINGERPRINTED", "kernel_backend", "use_bf16_autocast", "resolve_auto", "lr_at",
           "make_optimizer", "train_fingerprint", "init_from_first_batch"]
