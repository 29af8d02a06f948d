"""The SAE training loop, read top to bottom: set up, resume, then per batch step and log / validate /
checkpoint, then finish (the phases: :class:`pipeline.train_loop.TrainRun`).

``train_sae`` streams batches from an activation dataset (never all in memory), runs on the GPU
when there is one (bf16 autocast, float32 weights and optimizer), and accumulates its statistics
on the device so a step never waits for the host; the only syncs are at log, validation and
checkpoint steps. Every ``checkpoint_every`` steps it writes ALL resume state in one object
(:mod:`pipeline.checkpoint`); rerunning after a kill continues from there, and on CPU the final
weights are bit-identical to an uninterrupted run.

Under torchrun it is data-parallel (:mod:`pipeline.distributed`): W processes share each batch of the
one-process stream, ``B / W`` rows each; the losses' batch statistics and the dead-latent counts are global
(:mod:`pipeline.sae.batch`) and the gradients summed, so every process takes the same step as one process
would on the whole batch (up to float summation order). Rank 0 alone validates, logs and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.activations import ActivationDataset, open_activations
from pipeline.errors import UserError
from pipeline.io import nan_to_null
from pipeline.params import Params
from pipeline.params.sae import SAEParams, TrainParams
from pipeline.sae import SAE, SAEConfig, config_from_params
from pipeline.train_loop import CURVE_COLUMNS, LogFn, TrainRun

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What :func:`train_sae` returns. ``summary`` is a function of data, params and seed (a seeded CPU run
    gives the same values: it is the hook's entry in ``metrics/train.json``); the wall-clock figures,
    which vary run to run, are kept apart from it."""

    sae: SAE  # trained, eval mode (also saved to out_dir)
    summary: dict[str, Any]  # steps, tokens, d_sae, the curve's last values (SUMMARY_NAMES), val_* metrics
    train_seconds: float  # this process's training time, resumed part only
    tokens_per_s: float


def train_sae(
    dataset: ActivationDataset,
    sae_cfg: SAEConfig,
    train_cfg: TrainParams,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    seed: int,
    val_dataset: ActivationDataset | None = None,
    log_fn: LogFn | None = None,
    *,
    curve_path: str | Path | None = None,
    on_step: Callable[[int], None] | None = None,
    target: ActivationDataset | None = None,
    val_target: ActivationDataset | None = None,
) -> TrainResult:
    """Train one SAE on ``dataset`` (``acts [N, d_model]``); save it to ``out_dir`` (``save_sae``); return it
    with its summary and timing (:class:`TrainResult`).

    ``log_fn`` receives dict rows as training goes: ``kind="train"`` (one per log interval, the curve)
    and ``"val"`` (validation passes). ``curve_path`` gets the training curve as CSV
    (``CURVE_COLUMNS``). ``on_step(step)`` is called after each completed step (tests use it to
    simulate a kill). Raises :class:`UserError` on non-finite inputs or loss, naming the step.
    A transcoder (``sae_cfg.arch`` 'transcoder') trains on pairs: ``target`` (and ``val_target``) are the MLP-output
    datasets aligned with ``dataset`` (and ``val_dataset``), read in lockstep (:mod:`pipeline.pairs`).
    Under torchrun, every process calls this; only rank 0 emits rows and writes files.
    The phases are :class:`pipeline.train_loop.TrainRun`'s methods.
    """
    run = TrainRun.set_up(dataset, sae_cfg, train_cfg, Path(checkpoint_dir), seed, val_dataset, log_fn, target,
                          val_target)
    run.resume()
    # closing(): a kill or error mid-loop stops the reader thread at once, not at garbage collection.
    with run.progress() as pbar, closing(run.batches()) as batches:
        for x in batches:  # x [B / world, d_model]: this process's rows of the step's batch
            run.train_step(x)
            pbar.update(1)
            run.log_validate_checkpoint(pbar)
            if on_step is not None:
                on_step(run.step)
    summary, elapsed = run.finish(Path(out_dir), Path(curve_path) if curve_path is not None else None)
    steps_here = run.total_steps - run.step_start
    return TrainResult(run.sae, summary, train_seconds=elapsed,
                       tokens_per_s=steps_here * run.batch_size / elapsed if elapsed > 0 else float("nan"))


def sae_config(params: Params | tuple[SAEParams, TrainParams], d_model: int, hook: str) -> SAEConfig:
    """``params.sae`` + the dataset's width -> the SAE's config (``params`` or ``(sae, train)`` params)."""
    return config_from_params(params.sae if isinstance(params, Params) else params[0], d_model, hook)


def train_on_dataset(data: str | Path, out: str | Path, sae_params: SAEParams, train_params: TrainParams, seed: int = 0,
                     val_data: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                     curve_path: str | Path | None = None, target_data: str | Path | None = None,
                     val_target_data: str | Path | None = None) -> dict[str, Any]:
    """Train an SAE on any activation dataset directory (``pipeline.activations`` format); a transcoder on ``data``
    (MLP inputs) and ``target_data`` (their MLP outputs, row for row; ``val_target_data`` those of ``val_data``).

    The Python entry point behind ``sae train --data DIR --out DIR``; imports nothing from ``stages``. The SAE lands in ``out``
    (``sae.safetensors`` + ``cfg.json``); checkpoints default to ``<out>/checkpoints``. Returns the
    run summary (final loss, L0, FVU, dead fraction, validation metrics, tokens/s).
    """
    out = Path(out)
    dataset = open_activations(data)
    val = open_activations(val_data) if val_data else None
    target = open_activations(target_data) if target_data else None
    val_target = open_activations(val_target_data) if val_target_data else None
    return train_hook(dataset, val, out, Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints",
                      Path(curve_path) if curve_path else None, sae_params, train_params, seed, target, val_target)


def train_hook(dataset: ActivationDataset, val: ActivationDataset | None, out: Path, ckpt: Path,
               curve: Path | None, sae_params: SAEParams, train_params: TrainParams, seed: int,
               target: ActivationDataset | None = None, val_target: ActivationDataset | None = None) -> dict[str, Any]:
    """One hook's SAE from params (what ``sae train`` runs per hook): config, :func:`train_sae`, logged
    timing; returns the summary for ``metrics/train.json`` (NaN as null). A transcoder's ``target`` (MLP-output
    dataset) is recorded in its config as ``hook_out``."""
    hook = dataset.hook
    if val is not None and val.d_model != dataset.d_model:
        raise UserError(f"{val.root}: validation d_model {val.d_model} != training d_model {dataset.d_model}")
    cfg = sae_config((sae_params, train_params), dataset.d_model, hook)
    if target is not None:
        cfg.hook_out = target.hook
    log.info("training %s SAE on %s: d_model=%d d_sae=%d, %d tokens", cfg.arch, dataset.root, cfg.d_in, cfg.d_sae,
             dataset.n_tokens)

    def on_row(row: dict[str, Any]) -> None:
        if row["kind"] == "train":
            log.info("step %d: loss=%.4g l0=%.1f fvu=%.4f dead=%.3f %.0f tok/s", row["step"], row["loss"], row["l0"],
                     row["fvu"], row["dead_fraction"], row["tokens_per_s"])

    result = train_sae(dataset, cfg, train_params, out, ckpt, seed, val_dataset=val, log_fn=on_row, curve_path=curve,
                       target=target, val_target=val_target)
    # Timings vary run to run, so they are logged only; metrics/train.json must not (a checked-out commit
    # reproduces it exactly).
    log.info("%s: %d steps in %.1f s, %.0f tokens/s", hook, result.summary["steps"], result.train_seconds,
             result.tokens_per_s)
    return nan_to_null(result.summary)


__all__ = ["train_sae", "TrainResult", "train_on_dataset", "train_hook", "sae_config", "CURVE_COLUMNS"]
