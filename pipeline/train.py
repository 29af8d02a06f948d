"""The SAE training loop: one function, read top to bottom (set LR, step, log, validate, checkpoint).

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

import csv
import dataclasses
import io
import logging
import random
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.activations import ActivationDataset, open_activations
from pipeline.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    same_start,
    save_checkpoint,
)
from pipeline.errors import UserError
from pipeline.evaluate import reconstruction_metrics
from pipeline.io import atomic_write_text, nan_to_null
from pipeline.loader import batches_per_epoch, epoch_seed, train_batches
from pipeline.params import Params
from pipeline.params.sae import SAEParams, TrainParams
from pipeline.progress import Progress
from pipeline.sae import SAE, SAEConfig, batch, config_from_params, make_sae, save_sae
from pipeline.train_setup import (
    init_from_first_batch,
    kernel_backend,
    lr_at,
    make_optimizer,
    resolve_auto,
    train_fingerprint,
    use_bf16_autocast,
)
from pipeline.trainstats import LatentTracker, RunningStats

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("step", "tokens", "loss", "l0", "fvu", "dead_fraction", "dense_fraction", "lr")
# Final training-curve values in the summary, named by definition (see pipeline.trainstats): the
# curve's FVU is centred on each batch's mean, dead/dense fractions use the token window.
SUMMARY_NAMES = {"loss": "loss", "l0": "l0@1", "fvu": "fvu_batch@1", "dead_fraction": "dead_fraction_window@1",
                 "dense_fraction": "dense_fraction_window@1"}
LogFn = Callable[[dict[str, Any]], None]


def write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


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
) -> TrainResult:
    """Train one SAE on ``dataset`` (``acts [N, d_model]``); save it to ``out_dir`` (``save_sae``); return it
    with its summary and timing (:class:`TrainResult`).

    ``log_fn`` receives dict rows as training goes: ``kind="train"`` (one per log interval, the curve)
    and ``"val"`` (validation passes). ``curve_path`` gets the training curve as CSV
    (``CURVE_COLUMNS``). ``on_step(step)`` is called after each completed step (tests use it to
    simulate a kill). Raises :class:`UserError` on non-finite inputs or loss, naming the step.
    Under torchrun, every process calls this; only rank 0 emits rows and writes files.
    """
    cfg = resolve_auto(train_cfg, sae_cfg.arch)  # fingerprint, cfg.json and the loop see the decided dtype/kernels
    # Our own copy: init_from_data sets the SAE's scaling_factor in its cfg, and the caller's
    # config must stay what it was (it is fingerprinted again on resume).
    sae_cfg = SAEConfig.from_dict(sae_cfg.to_dict())
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    if sae_cfg.d_in != dataset.d_model:
        raise UserError(f"{dataset.root}: d_model {dataset.d_model} does not match the SAE's d_in {sae_cfg.d_in}")
    ranks, device = distributed.start(cfg.device, "train.device")
    use_bf16 = use_bf16_autocast(cfg.dtype, device)
    B = cfg.batch_size
    if B % ranks.world:
        raise UserError(f"train.batch_size: {B} is not divisible by the {ranks.world} training processes")
    per_epoch = batches_per_epoch(dataset, B)
    total_steps = (cfg.n_tokens or per_epoch * B) // B
    if total_steps == 0:
        raise UserError(f"train.n_tokens: {cfg.n_tokens} is less than one batch of train.batch_size={B}")
    emit = (log_fn if ranks.is_main else None) or (lambda row: None)

    # Fresh state, then overwrite it from a checkpoint if there is a compatible one.
    fp = train_fingerprint(sae_cfg, cfg, seed, dataset, device)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    sae = make_sae(sae_cfg, seed=seed).to(device)
    sae.kernel_backend = kernel_backend(cfg.kernels, sae_cfg.arch, device)
    opt = make_optimizer(sae, cfg, device)
    tracker = LatentTracker(sae_cfg.d_sae, cfg.dead_window_tokens, device)
    stats = RunningStats(device)
    curve: list[dict[str, Any]] = []
    val_row: dict[str, Any] = {}
    step = 0
    state = load_checkpoint(checkpoint_dir, fp, world_size=ranks.world)
    if ranks.parallel:  # several machines: each reads its own copy of the data and of the checkpoints
        same_start(ranks, fp, state, checkpoint_dir)
    if state is not None:
        sae.cfg.scaling_factor = state["sae_cfg"]["scaling_factor"]  # set by init_from_data, not a weight
        sae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        stats.load_state_dict(state["stats"])
        curve, val_row, step = state["curve"], state["val"], state["step"]
        restore_rng(state["rng"])
    else:
        # Data-dependent initialisation (b_dec, input scaling) from the first training batch.
        # Every process reads the whole batch: the same statistics; rank 0's result is then the one kept.
        first = next(dataset.iter_batches(B, shuffle=True, seed=epoch_seed(seed, 0), drop_last=True))
        init_from_first_batch(sae, first, dataset, device)
        if ranks.parallel:  # identical starting weights even where processes on different machines round differently
            distributed.broadcast_tensors_([*sae.parameters(), *sae.buffers()])
            sae.cfg.scaling_factor = distributed.broadcast_object(sae.cfg.scaling_factor)

    def checkpoint(complete: bool = False) -> None:
        check_finite()
        if not ranks.is_main:
            return
        save_checkpoint(checkpoint_dir, {
            "step": step, "complete": complete, "fingerprint": fp, "sae_cfg": sae.cfg.to_dict(), "model": sae.state_dict(),
            "optimizer": opt.state_dict(), "schedule": {"step": step, "total_steps": total_steps},
            "rng": capture_rng(), "cursor": {"epoch": step // per_epoch, "batch": step % per_epoch, "world_size": ranks.world},
            "tracker": tracker.state_dict(), "stats": stats.state_dict(), "curve": curve, "val": val_row,
        })

    # First step whose input or loss was not finite (-1: none); checked at every host sync.
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def check_finite() -> None:
        if ranks.parallel:  # the first bad step of any process, so that all of them stop together
            first = distributed.all_reduce_(torch.where(bad_step < 0, total_steps, bad_step), op="min")
            bad = int(first) if int(first) < total_steps else -1
        else:
            bad = int(bad_step)
        if bad >= 0:
            raise UserError(f"train step {bad}: non-finite loss or input activations (NaN/inf) in {dataset.root}; "
                            f"the last good checkpoint in {checkpoint_dir} is kept")

    def validate() -> None:
        nonlocal val_row
        if val_dataset is None or not ranks.is_main:
            return
        m = reconstruction_metrics(sae, val_dataset, n_tokens=cfg.val_tokens, batch_size=B, device=device)
        val_row = {"kind": "val", "step": step, **{f"val_{k}": v for k, v in m.items()}}
        log.info("step %d validation: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
        emit(val_row)

    t_start, step_start = time.perf_counter(), step
    t_log, tokens_log = t_start, step * B
    sae.train()
    # A bar on a terminal, else a line every few seconds (under `dvc repro`); only rank 0 speaks.
    pbar = Progress(f"train {sae_cfg.hook}".rstrip(), total_steps, unit="steps", initial=step, tokens_per_unit=B,
                    enabled=ranks.is_main)
    part = (ranks.rank, ranks.world)

    def whole_batch():  # reductions inside see the batch of all processes (pipeline.sae.batch)
        return batch.across(ranks.world, distributed)

    # closing(): a kill or error mid-loop stops the reader thread at once, not at garbage collection.
    with pbar, closing(train_batches(dataset, B, seed, step, total_steps, device, cfg.prefetch, part)) as batches:
        for x in batches:  # x [B / world, d_model]: this process's rows of the step's batch
            if sae.wants_resample(step):  # relu_l1 2023 recipe (Towards Monosemanticity, "Neuron resampling")
                with whole_batch():  # every process resamples the same way, from the whole batch
                    x_all = batch.gather_rows(x)
                revived = sae.resample_dead(x_all, opt, tracker.dead_mask())
                tracker.revive(revived)  # a resampled latent starts a fresh window
                log.info("step %d: resampled %d dead latents", step, revived.numel())
            lr = lr_at(step, total_steps, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16), whole_batch():
                # The latents dead as the step begins (the tracker's record, the same on every process):
                # AuxK's candidates.
                out = sae.training_loss(x, step, total_steps, tracker.dead_mask())
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if ranks.parallel:
                distributed.sum_gradients_(sae.parameters())
            sae.before_optimizer_step()  # e.g. remove gradient parallel to unit-norm decoder rows
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            opt.step()
            sae.after_optimizer_step()  # e.g. renormalise decoder rows

            bad = ~(torch.isfinite(out.loss) & torch.isfinite(x).all())
            bad_step = torch.where(bad & (bad_step < 0), step, bad_step)
            with whole_batch():  # statistics of the whole batch, the same on every process
                counts, l0 = out.firing(sae_cfg.d_sae)  # [d_sae], scalar: from dense latents or the sparse code
                counts, l0 = batch.total(counts), batch.average(l0)
                stats.update(out.loss, x, out.x_hat, l0)
            tracker.update(counts, B)
            step += 1
            pbar.update(1)

            if step % cfg.log_every == 0 or step == total_steps:
                check_finite()
                now = time.perf_counter()
                row = {"kind": "train", "step": step, "tokens": step * B, **stats.read_and_reset(),
                       **tracker.fractions(), "lr": lr, "tokens_per_s": (step * B - tokens_log) / max(now - t_log, 1e-9)}
                t_log, tokens_log = now, step * B
                curve.append({k: row[k] for k in CURVE_COLUMNS})
                pbar.set_postfix(loss=f"{row['loss']:.4g}", L0=f"{row['l0']:.1f}", FVU=f"{row['fvu']:.3f}",
                                 tok_s=f"{row['tokens_per_s']:.3g}")
                emit(row)
            if cfg.val_every and step % cfg.val_every == 0 and step < total_steps:
                validate()
                sae.train()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint()
            if on_step is not None:
                on_step(step)

    check_finite()
    elapsed = time.perf_counter() - t_start
    validate()
    sae.eval()
    if ranks.is_main:
        save_sae(sae, out_dir, training={**dataclasses.asdict(cfg), "seed": seed, "steps": total_steps,
                                         "world_size": ranks.world})
    checkpoint(complete=True)
    if curve_path is not None and ranks.is_main:
        write_curve(Path(curve_path), curve)
    last = curve[-1] if curve else {}
    summary = {"steps": total_steps, "tokens": total_steps * B, "d_sae": sae_cfg.d_sae,
               **{name: last[k] for k, name in SUMMARY_NAMES.items() if k in last},
               **{k: v for k, v in val_row.items() if k.startswith("val_")}}
    return TrainResult(sae, summary, train_seconds=elapsed,
                       tokens_per_s=(total_steps - step_start) * B / elapsed if elapsed > 0 else float("nan"))



def sae_config(params: Params | tuple[SAEParams, TrainParams], d_model: int, hook: str) -> SAEConfig:
    """``params.sae`` + the dataset's width -> the SAE's config (``params`` or ``(sae, train)`` params)."""
    return config_from_params(params.sae if isinstance(params, Params) else params[0], d_model, hook)


def train_on_dataset(data: str | Path, out: str | Path, sae_params: SAEParams, train_params: TrainParams, seed: int = 0,
                     val_data: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                     curve_path: str | Path | None = None) -> dict[str, Any]:
    """Train an SAE on any activation dataset directory (``pipeline.activations`` format).

    The Python entry point behind ``sae train --data DIR --out DIR``; imports nothing from ``stages``. The SAE lands in ``out``
    (``sae.safetensors`` + ``cfg.json``); checkpoints default to ``<out>/checkpoints``. Returns the
    run summary (final loss, L0, FVU, dead fraction, validation metrics, tokens/s).
    """
    out = Path(out)
    dataset = open_activations(data)
    val = open_activations(val_data) if val_data else None
    return train_hook(dataset, val, out, Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints",
                      Path(curve_path) if curve_path else None, sae_params, train_params, seed)


def train_hook(dataset: ActivationDataset, val: ActivationDataset | None, out: Path, ckpt: Path,
               curve: Path | None, sae_params: SAEParams, train_params: TrainParams, seed: int) -> dict[str, Any]:
    """One hook's SAE from params (what ``sae train`` runs per hook): config, :func:`train_sae`, logged
    timing; returns the summary for ``metrics/train.json`` (NaN as null)."""
    hook = dataset.hook
    if val is not None and val.d_model != dataset.d_model:
        raise UserError(f"{val.root}: validation d_model {val.d_model} != training d_model {dataset.d_model}")
    cfg = sae_config((sae_params, train_params), dataset.d_model, hook)
    log.info("training %s SAE on %s: d_model=%d d_sae=%d, %d tokens", cfg.arch, dataset.root, cfg.d_in, cfg.d_sae,
             dataset.n_tokens)

    def on_row(row: dict[str, Any]) -> None:
        if row["kind"] == "train":
            log.info("step %d: loss=%.4g l0=%.1f fvu=%.4f dead=%.3f %.0f tok/s", row["step"], row["loss"], row["l0"],
                     row["fvu"], row["dead_fraction"], row["tokens_per_s"])

    result = train_sae(dataset, cfg, train_params, out, ckpt, seed, val_dataset=val, log_fn=on_row, curve_path=curve)
    # Timings vary run to run, so they are logged only; metrics/train.json must not (a checked-out commit
    # reproduces it exactly).
    log.info("%s: %d steps in %.1f s, %.0f tokens/s", hook, result.summary["steps"], result.train_seconds,
             result.tokens_per_s)
    return nan_to_null(result.summary)


__all__ = ["train_sae", "TrainResult", "train_on_dataset", "train_hook", "sae_config", "CURVE_COLUMNS"]
