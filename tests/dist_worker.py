"""One process of a data-parallel test run: ``python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py``.

Trains each SAE of :data:`VARIANTS` on ``--data`` with :data:`TRAIN` into ``--out/<name>`` (rank 0 writes), the
way ``sae train`` does under torchrun. ``--kill-at STEP`` ends every process right after that step, as a kill
would (no cleanup, no final checkpoint); ``--rank1-checkpoints DIR`` gives rank 1 a checkpoint folder of
its own, as on a second machine without a shared filesystem; ``--load-log FILE`` appends ``rank path`` to FILE
for each checkpoint read; ``--realistic``: :data:`REALISTIC`'s batches and steps. Also imported by tests/test_distributed.py for the same settings.

``TRITON_INTERPRET=1 ... --variants topk_triton,batchtopk_triton``: the same through the sparse Triton kernels.

``dist_worker.py --shard-log FILE extract``: runs ``sae extract`` and appends ``rank dataset shard`` to FILE for
every shard this process writes (who computed what).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.params.sae import TrainParams
from pipeline.sae import SAEConfig

D, D_SAE, K, SEED = 16, 64, 4, 3
# Every architecture. A latent silent for one batch (64 tokens) is dead, so AuxK works from the first steps
# (topk, batchtopk: 2-6% dead); the 2023 recipe's strong L1 and high LR kill latents, resampled at steps 10-20.
VARIANTS: dict[str, dict] = {
    "topk": {"arch": "topk"}, "batchtopk": {"arch": "batchtopk"}, "relu_l1": {"arch": "relu_l1"},
    "relu_l1_2023": {"arch": "relu_l1", "recipe": "2023", "resample_every": 5, "l1_coeff": 30.0, "l1_warmup_steps": 0},
    "jumprelu": {"arch": "jumprelu"}, "gated": {"arch": "gated"}, "kl": {"arch": "kl"},
    "dense": {"arch": "dense", "hidden_sizes": [32, 8, 32]},
    # Matryoshka: the level losses and both AuxK scopes over the global batch (dense torch step only).
    "matryoshka_batchtopk": {"arch": "matryoshka_batchtopk"},
    "matryoshka_per_level": {"arch": "matryoshka_batchtopk", "matryoshka_auxk": "per_level",
                             "matryoshka_weighting": "bussmann"},
    # The sparse Triton kernels' training path (CUDA's default), run by Triton's interpreter on CPU.
    "topk_triton": {"arch": "topk"}, "batchtopk_triton": {"arch": "batchtopk"},
}
TRAIN = dict(device="cpu", dtype="float32", batch_size=64, lr=3e-3, n_tokens=64 * 24, warmup_steps=3, log_every=3,
             val_every=0, checkpoint_every=5, dead_window_tokens=64, prefetch=2)
# The interpreter takes seconds per step: 4 steps (AuxK from the second, a latent is dead after one batch).
TRITON = {"kernels": "triton", "n_tokens": 64 * 4, "log_every": 2}
TRAIN_OVERRIDES: dict[str, dict] = {"relu_l1_2023": {"lr": 0.05}, "topk_triton": TRITON, "batchtopk_triton": TRITON}
TRITON_VARIANTS = ("topk_triton", "batchtopk_triton")
# Transcoders (MLP input -> output), trained with ``--target``: a dataset of the same rows (pipeline.pairs).
PAIRED_VARIANTS: dict[str, dict] = {
    "transcoder": {"arch": "transcoder"},
    "skip_transcoder_batchtopk": {"arch": "transcoder", "skip": True, "transcoder_activation": "batchtopk"},
}
# A realistic size (``--realistic``, d_in 256 -> d_sae 4096 from the data and --d-sae): batches of 1,024 rows, a few
# steps, AuxK from the second (a latent silent for one batch is dead), no checkpoint.
REALISTIC = dict(batch_size=1024, n_tokens=1024 * 3, warmup_steps=1, log_every=1, checkpoint_every=0,
                 dead_window_tokens=1024)


def sae_config(name: str, d_in: int = D, d_sae: int = D_SAE) -> SAEConfig:
    kw = dict({**VARIANTS, **PAIRED_VARIANTS}[name])
    d_sae = min(kw.get("hidden_sizes", [d_sae]))
    return SAEConfig(d_in=d_in, d_sae=d_sae, k=K, hook="synthetic", **kw)


def train_params(name: str, realistic: bool = False) -> TrainParams:
    return TrainParams(**{**TRAIN, **TRAIN_OVERRIDES.get(name, {}), **(REALISTIC if realistic else {})})  # type: ignore[arg-type]


def log_checkpoint_reads(log: Path) -> None:
    """Append ``rank path`` to ``log`` for every checkpoint file (``state.pt``) this process reads."""
    import torch

    real = torch.load

    def logged(f, *a, **kw):  # type: ignore[no-untyped-def]
        if Path(str(f)).name == "state.pt":
            with open(log, "a") as out:
                out.write(f"{os.environ['RANK']} {f}\n")
        return real(f, *a, **kw)

    torch.load = logged


def stage_with_shard_log(log: Path, args: list[str]) -> None:
    import pipeline.activations as activations
    from stages.cli import main as sae

    real = activations.ActivationWriter.write_shard

    def logged(self, index, *a, **kw):  # type: ignore[no-untyped-def]
        info = real(self, index, *a, **kw)
        with open(log, "a") as f:
            f.write(f"{os.environ['RANK']} {self.root} {index}\n")
        return info

    activations.ActivationWriter.write_shard = logged  # type: ignore[method-assign]
    sae(args, prog_name="sae")


def main() -> None:
    from pipeline.activations import open_activations
    from pipeline.train import train_sae

    if sys.argv[1] == "--shard-log":
        stage_with_shard_log(Path(sys.argv[2]), sys.argv[3:])  # exits with the stage's code

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in TRITON_VARIANTS))
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--rank1-checkpoints", type=Path, default=None, help="rank 1's own checkpoint folder (a 2nd node)")
    ap.add_argument("--d-sae", type=int, default=D_SAE, help="latents (d_in is the dataset's)")
    ap.add_argument("--realistic", action="store_true", help="REALISTIC's batches and steps")
    ap.add_argument("--load-log", type=Path, default=None, help="log each checkpoint read here")
    ap.add_argument("--target", type=Path, default=None, help="the target dataset of PAIRED_VARIANTS")
    args = ap.parse_args()
    if args.load_log is not None:
        log_checkpoint_reads(args.load_log)

    def on_step(step: int) -> None:
        if step == args.kill_at:
            sys.stdout.flush()
            os._exit(17)

    ds = open_activations(args.data)
    target = {"target": open_activations(args.target)} if args.target is not None else {}
    for name in args.variants.split(","):
        ckpt = args.out / f"{name}_ckpt"
        if args.rank1_checkpoints is not None and os.environ["RANK"] == "1":
            ckpt = args.rank1_checkpoints
        train_sae(ds, sae_config(name, ds.d_model, args.d_sae), train_params(name, args.realistic), args.out / name,
                  ckpt, seed=SEED, curve_path=args.out / f"{name}.csv", on_step=on_step,
                  **(target if name in PAIRED_VARIANTS else {}))


if __name__ == "__main__":
    main()
