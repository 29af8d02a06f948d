"""``sae train``: one SAE per hook, from ``data/activations/train/<hook>/`` to ``models/sae/<hook>/``.

Writes ``models/sae/<hook>/sae.safetensors`` + ``cfg.json``, ``plots/train/<hook>.csv`` (the
training curve), ``metrics/train.json`` and resumable checkpoints under ``checkpoints/<hook>/``.
With ``--data DIR --out DIR`` it trains on any activation dataset instead (bring your own; see
README, "Training on your own activations").
Under torchrun, or with ``train.processes`` > 1, the processes train each SAE together (data-parallel,
``pipeline.train``); rank 0 alone writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from pipeline import distributed
from pipeline.activations import ActivationDataset, open_activations
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, nan_to_null
from pipeline.params import Params
from pipeline.params.sae import SAEParams, TrainParams
from stages.common import stage_command
from stages.launch import relaunched
from stages.paths import ACTIVATIONS, METRICS, MODELS, TRAIN_CURVES

log = logging.getLogger("sae.train")

CHECKPOINTS = Path("checkpoints")
TIMING_KEYS = ("kind", "tokens_per_s", "train_seconds")


def sae_config(params: Params | tuple[SAEParams, TrainParams], d_model: int, hook: str):  # -> SAEConfig
    """``params.sae`` + the dataset's width -> the SAE's config; dead latents use ``train.dead_window_tokens``."""
    from pipeline.sae import config_from_params

    sae_p, train_p = (params.sae, params.train) if isinstance(params, Params) else params
    return config_from_params(sae_p, d_model, hook, dead_after_tokens=train_p.dead_window_tokens)


def train_on_dataset(data: str | Path, out: str | Path, sae_params: SAEParams, train_params: TrainParams, seed: int = 0,
                     val_data: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                     curve_path: str | Path | None = None) -> dict[str, Any]:
    """Train an SAE on any activation dataset directory (``pipeline.activations`` format).

    The Python entry point behind ``sae train --data DIR --out DIR``. The SAE lands in ``out``
    (``sae.safetensors`` + ``cfg.json``); checkpoints default to ``<out>/checkpoints``. Returns the
    run summary (final loss, L0, FVU, dead fraction, validation metrics, tokens/s).
    """
    from pipeline.train import train_sae

    out = Path(out)
    dataset = open_activations(data)
    val = open_activations(val_data) if val_data else None
    return _train_one(dataset, val, out, Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints",
                      Path(curve_path) if curve_path else None, sae_params, train_params, seed, train_sae)


def _train_one(dataset: ActivationDataset, val: ActivationDataset | None, out: Path, ckpt: Path,
               curve: Path | None, sae_params: SAEParams, train_params: TrainParams, seed: int, train_sae: Any) -> dict[str, Any]:
    hook = dataset.hook
    if val is not None and val.d_model != dataset.d_model:
        raise UserError(f"{val.root}: validation d_model {val.d_model} != training d_model {dataset.d_model}")
    cfg = sae_config((sae_params, train_params), dataset.d_model, hook)
    log.info("training %s SAE on %s: d_model=%d d_sae=%d, %d tokens", cfg.arch, dataset.root, cfg.d_in, cfg.d_sae,
             dataset.n_tokens)
    summary: dict[str, Any] = {}

    def on_row(row: dict[str, Any]) -> None:
        if row["kind"] == "summary":
            # Timings vary run to run; metrics/train.json must not (a checked-out commit reproduces it exactly).
            log.info("%s: %d steps in %.1f s, %.0f tokens/s", hook, row["steps"], row["train_seconds"], row["tokens_per_s"])
            summary.update(nan_to_null({k: v for k, v in row.items() if k not in TIMING_KEYS}))
        elif row["kind"] == "train":
            log.info("step %d: loss=%.4g l0=%.1f fvu=%.4f dead=%.3f %.0f tok/s", row["step"], row["loss"], row["l0"],
                     row["fvu"], row["dead_fraction"], row["tokens_per_s"])

    train_sae(dataset, cfg, train_params, out, ckpt, seed, val_dataset=val, log_fn=on_row, curve_path=curve)
    return summary


@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="With --data: folder for sae.safetensors + cfg.json (default: models/sae/<hook of the dataset>).")
@click.option("--val-data", "val_data", type=click.Path(file_okay=False, exists=True), default=None,
              help="With --data: a held-out activation dataset for validation.")
@click.option("--data", "data", type=click.Path(file_okay=False, exists=True), default=None,
              help="Train on this activation dataset (a folder with manifest.json) instead of the pipeline's.")
@stage_command(help="Activation datasets -> one trained SAE per hook (resumes from checkpoints/ after a kill).")
def command(params: Params, data: str | None = None, val_data: str | None = None, out: str | None = None) -> None:
    from pipeline.devices import resolve_device
    from pipeline.environment import environment
    from pipeline.numerics import apply_numerics
    from pipeline.train import resolve_auto, train_sae

    if data is None and (val_data or out):
        raise click.UsageError("--val-data and --out need --data")
    if relaunched("train", params.train.processes, params.train.device):  # train.processes > 1: ran as N processes
        return
    distributed.start(params.train.device, "train.device")  # under torchrun: join now, and only rank 0 logs
    apply_numerics(params.numerics.portable, params.numerics.threads)
    train_p = resolve_auto(params.train, params.sae.arch)  # 'auto' dtype and kernels decided once, recorded below
    if data is not None:
        dataset = open_activations(data)
        out_dir = Path(out) if out else MODELS / dataset.hook
        summary = train_on_dataset(data, out_dir, params.sae, train_p, params.seed, val_data=val_data,
                                   checkpoint_dir=out_dir / "checkpoints", curve_path=out_dir / "train_curve.csv")
        log.info("saved %s: %s", out_dir, summary)
        return

    metrics: dict[str, Any] = {}
    for hook in params.extract.hooks:
        dataset = open_activations(ACTIVATIONS / "train" / hook)
        val_root = ACTIVATIONS / "validation" / hook
        val = open_activations(val_root) if (val_root / "manifest.json").is_file() else None
        metrics[hook] = _train_one(dataset, val, MODELS / hook, CHECKPOINTS / hook, TRAIN_CURVES / f"{hook}.csv",
                                   params.sae, train_p, params.seed, train_sae)
    metrics["environment"] = environment({"train.device": resolve_device(train_p.device), "train.dtype": train_p.dtype,
                                          "train.kernels": train_p.kernels, "numerics.portable": params.numerics.portable})
    if distributed.current().is_main:  # under torchrun, rank 0 writes
        atomic_write_json(METRICS / "train.json", metrics)
