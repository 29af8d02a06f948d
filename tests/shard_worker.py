"""One process of a latent-sharded test run: ``python -m torch.distributed.run --nproc-per-node N
tests/shard_worker.py --data DIR --out DIR``.

Trains each SAE of ``--variants`` (topk, batchtopk) with ``train.parallel: latents`` (:data:`TRAIN`) into
``--out/<name>`` through :func:`pipeline.train.train_sae`, as ``sae train`` does under torchrun. After every step
each process appends the sha256 of its replicated gradient (``b_dec``) and of its replicated tensors to
``--out/<name>.replicated.<rank>``, so the test can check they are bitwise the same on every process; rank 0
writes the run's summary (validated on the training data itself) to ``--out/<name>.summary.json``.
A variant named ``<arch>-<tag>`` stops after step ``--stop-at`` (an exception: no final checkpoint, no SAE, as a
kill leaves it; rank 0 copies the checkpoint folder to ``<name>_ckpt_at_stop``), then trains again in the same
processes: a new run that resumes from the checkpoint file. Also imported by tests/test_sharding.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.params.sae import TrainParams
from pipeline.sae import SAEConfig

D_SAE, K, SEED = 8192, 32, 3
# A latent silent for one batch is dead, so AuxK (its own global top-k) works from the second step; grad_clip on.
TRAIN = dict(device="cpu", dtype="float32", kernels="torch", batch_size=128, lr=3e-3, n_tokens=128 * 4, warmup_steps=1,
             log_every=2, val_every=2, val_tokens=256, checkpoint_every=2, dead_window_tokens=128, prefetch=0, grad_clip=1.0,
             parallel="latents")


def sae_config(arch: str, d_in: int, d_sae: int = D_SAE, dtype: str = "float32") -> SAEConfig:
    return SAEConfig(d_in=d_in, d_sae=d_sae, k=K, hook="synthetic", arch=arch, dtype=dtype)


def train_params(**over: object) -> TrainParams:
    return TrainParams(**{**TRAIN, **over})  # type: ignore[arg-type]


class Stopped(Exception):
    """Ends a run between two steps, as a kill would: no final checkpoint, no SAE."""


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    from pipeline.activations import open_activations
    from pipeline.train import train_sae
    from pipeline.train_loop import TrainRun

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="topk,batchtopk")
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sae-dtype", default="float32")
    args = ap.parse_args()
    rank = os.environ["RANK"]

    real_step = TrainRun.train_step
    record: list[str] = []

    def recorded(self: TrainRun, x: torch.Tensor) -> None:
        real_step(self, x)
        sae = self.sae
        record.append(f"{digest([sae.b_dec.grad])} {digest([sae.b_dec, *sae.buffers()])}")  # type: ignore[list-item]

    TrainRun.train_step = recorded  # type: ignore[method-assign]

    def on_step(step: int) -> None:
        if step == args.stop_at:
            raise Stopped

    ds = open_activations(args.data)
    params = train_params(n_tokens=TRAIN["batch_size"] * args.steps)
    for name in args.variants.split(","):
        record.clear()
        arch, stopped = name.split("-")[0], "-" in name  # e.g. "topk-stopped": stopped at --stop-at, then resumed
        cfg, ckpt = sae_config(arch, ds.d_model, dtype=args.sae_dtype), args.out / f"{name}_ckpt"

        def train(hook: Callable[[int], None] | None = None) -> dict:
            return train_sae(ds, cfg, params, args.out / name, ckpt, seed=SEED, val_dataset=ds,  # noqa: B023
                             curve_path=args.out / f"{name}.csv", on_step=hook).summary  # noqa: B023

        if stopped:
            try:
                train(on_step)
            except Stopped:
                pass
            if rank == "0":  # the checkpoint as a kill would leave it
                shutil.copytree(ckpt, args.out / f"{name}_ckpt_at_stop")
        summary = train()
        (args.out / f"{name}.replicated.{rank}").write_text("\n".join(record) + "\n")
        if rank == "0":
            (args.out / f"{name}.summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
