"""The phases of one SAE training run, in the order :func:`pipeline.train.train_sae` calls them.

:meth:`TrainRun.set_up` (config, process group, fresh SAE and optimizer) -> :meth:`~TrainRun.resume` (from a
compatible checkpoint, else the data-dependent initialisation) -> per batch :meth:`~TrainRun.step` (one
optimizer step, statistics on the device) then :meth:`~TrainRun.log_validate_checkpoint` (the only host syncs)
-> :meth:`~TrainRun.finish` (validate, save, the summary). A :class:`TrainRun` holds what the phases share:
the SAE, the optimizer, the statistics and the position in the run, i.e. what a checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import distributed, sharding
from pipeline.activations import ActivationDataset
from pipeline.checkpoint import capture_rng, restore_rng, resume_state, save_checkpoint
from pipeline.errors import UserError
from pipeline.evaluate import reconstruction_metrics
from pipeline.loader import batches_per_epoch, first_batch, train_batches
from pipeline.pairs import check_aligned, is_transcoder_arch, split
from pipeline.params.sae import TrainParams
from pipeline.progress import Progress
from pipeline.sae import SAE, LossOutput, SAEConfig, batch, make_sae, save_sae
from pipeline.train_setup import (
    init_from_first_batch,
    kernel_backend,
    lr_at,
    make_optimizer,
    resolve_auto,
    train_fingerprint,
    use_bf16_autocast,
)
from pipeline.trainstats import CURVE_COLUMNS, SUMMARY_NAMES, LatentTracker, RunningStats, write_curve

log = logging.getLogger("pipeline.train")  # the loop's lines keep the logger name they always had

LogFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainRun:
    """One run's shared state. ``step`` counts completed optimizer steps; ``curve`` and ``val_row`` are the
    logged rows so far; ``bad_step`` (scalar int64 on the device) the first step whose input or loss was not
    finite (-1: none), read at each host sync."""

    cfg: TrainParams  # auto dtype/kernels decided (resolve_auto)
    sae_cfg: SAEConfig  # the run's own copy: init_from_data sets its scaling_factor
    dataset: ActivationDataset
    val_dataset: ActivationDataset | None
    checkpoint_dir: Path
    seed: int
    ranks: distributed.Ranks
    device: torch.device
    use_bf16: bool
    per_epoch: int  # batches per pass over the data
    total_steps: int
    fingerprint: dict[str, str]  # what a checkpoint must match to be resumed
    sae: SAE
    opt: torch.optim.Optimizer
    tracker: LatentTracker
    stats: RunningStats
    emit: LogFn  # rank 0's log_fn; the others' do nothing
    bad_step: Tensor
    curve: list[dict[str, Any]] = field(default_factory=list)
    val_row: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    lr: float = 0.0  # the last step's learning rate (logged)
    # The clock: the resumed part's start, and the last log line's (for tokens/s).
    t_start: float = 0.0
    step_start: int = 0
    t_log: float = 0.0
    tokens_log: int = 0
    grad_sync: distributed.GradientSync | None = None  # data-parallel: gradient sums overlapped with backward
    # A transcoder's targets (pipeline.pairs): the MLP outputs of dataset's / val_dataset's MLP inputs, row for row.
    target: ActivationDataset | None = None
    val_target: ActivationDataset | None = None

    @property
    def paired(self) -> bool:
        return self.target is not None

    @functools.cached_property
    def shards(self) -> sharding.LatentShards | None:
        """``train.parallel: latents`` under several processes: this process's slice of the latents (None: every
        process holds the whole SAE)."""
        return sharding.plan(self.sae_cfg, self.cfg, self.ranks)

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    # ---- set-up ---------------------------------------------------------------------------------------
    @classmethod
    def set_up(cls, dataset: ActivationDataset, sae_cfg: SAEConfig, train_cfg: TrainParams, checkpoint_dir: Path,
               seed: int, val_dataset: ActivationDataset | None, log_fn: LogFn | None,
               target: ActivationDataset | None = None, val_target: ActivationDataset | None = None) -> TrainRun:
        """Decide the config, start the processes, check the sizes (and a transcoder's pairs, ``target`` and
        ``val_target``: :mod:`pipeline.pairs`); a fresh seeded SAE and its optimizer."""
        cfg = resolve_auto(train_cfg, sae_cfg.arch)  # fingerprint, cfg.json and the loop see the decided dtype/kernels
        # Our own copy: init_from_data sets the SAE's scaling_factor in its cfg, and the caller's
        # config must stay what it was (it is fingerprinted again on resume).
        sae_cfg = SAEConfig.from_dict(sae_cfg.to_dict())
        if sae_cfg.d_in != dataset.d_model:
            raise UserError(f"{dataset.root}: d_model {dataset.d_model} does not match the SAE's d_in {sae_cfg.d_in}")
        if is_transcoder_arch(sae_cfg.arch) != (target is not None):
            raise UserError(f"sae.arch {sae_cfg.arch!r}: " + ("trains on (MLP input, MLP output) pairs: no target "
                            "dataset given" if target is None else "is not a transcoder: it takes no target dataset"))
        if target is not None:
            check_aligned(dataset, target)
        if val_dataset is not None and val_target is not None:
            check_aligned(val_dataset, val_target)
        elif target is not None and val_dataset is not None:
            raise UserError(f"{val_dataset.root}: a transcoder validates on pairs: no validation target dataset given")
        ranks, device = distributed.start(cfg.device, "train.device")
        use_bf16 = use_bf16_autocast(cfg.dtype, device)
        shards = sharding.plan(sae_cfg, train_cfg, ranks)  # latent sharding: checked against the requested kernels
        if shards is not None:
            cfg = dataclasses.replace(cfg, kernels="torch")  # its step is the dense one (pipeline.sharding_step)
        B = cfg.batch_size
        if B % ranks.world and shards is None:  # (latent shards each read the whole batch)
            raise distributed.EveryRankError(f"train.batch_size: {B} is not divisible by the {ranks.world} training "
                                             f"processes")
        per_epoch = batches_per_epoch(dataset, B)
        total_steps = (cfg.n_tokens or per_epoch * B) // B
        if total_steps == 0:
            raise UserError(f"train.n_tokens: {cfg.n_tokens} is less than one batch of train.batch_size={B}")
        emit = (log_fn if ranks.is_main else None) or (lambda row: None)

        # Fresh state; resume() overwrites it from a checkpoint if there is a compatible one.
        fp = train_fingerprint(sae_cfg, cfg, seed, dataset, device, target)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        sae = shards.make_local(seed, device) if shards is not None else make_sae(sae_cfg, seed=seed).to(device)
        sae.kernel_backend = kernel_backend(cfg.kernels, sae_cfg.arch, device)
        return cls(cfg, sae_cfg, dataset, val_dataset, checkpoint_dir, seed, ranks, device, use_bf16, per_epoch,
                   total_steps, fp, sae, make_optimizer(sae, cfg, device),
                   LatentTracker(sae_cfg.d_sae, cfg.dead_window_tokens, device), RunningStats(device), emit,
                   torch.full((), -1, dtype=torch.int64, device=device),
                   grad_sync=distributed.GradientSync(sae.parameters()) if ranks.parallel and shards is None else None,
                   target=target, val_target=val_target)

    # ---- resume -----------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from a compatible checkpoint, or initialise from the data (b_dec, input scaling); then start
        the clock and put the SAE in training mode."""
        # Read once, by rank 0, and sent to the others; data-parallel, every process must see rank 0's inputs.
        state = resume_state(self.checkpoint_dir, self.fingerprint, self.ranks)
        sae = self.sae
        if state is not None:
            sae.cfg.scaling_factor = state["sae_cfg"]["scaling_factor"]  # set by init_from_data, not a weight
            sae.cfg.target_scaling_factor = state["sae_cfg"].get("target_scaling_factor", 1.0)  # a transcoder's
            if self.shards is not None:  # the checkpoint holds the whole SAE: keep this process's slice
                self.shards.load(sae, self.opt, state)
            else:
                sae.load_state_dict(state["model"])
                self.opt.load_state_dict(state["optimizer"])
            self.tracker.load_state_dict(state["tracker"])
            self.stats.load_state_dict(state["stats"])
            self.curve, self.val_row, self.step = state["curve"], state["val"], state["step"]
            restore_rng(state["rng"])
        else:
            # Data-dependent initialisation (b_dec, input scaling) from the first training batch.
            # Every process reads the whole batch: the same statistics; rank 0's result is then the one kept.
            B = self.batch_size
            first = first_batch(self.dataset, B, self.seed, self.target)
            init_from_first_batch(sae, first, self.dataset, self.device, self.paired)
            if self.ranks.parallel:  # identical starting weights even where processes on different machines round differently
                distributed.broadcast_tensors_(self.shards.replicated(sae) if self.shards is not None
                                               else [*sae.parameters(), *sae.buffers()])
                sae.cfg.scaling_factor = distributed.broadcast_object(sae.cfg.scaling_factor)
                sae.cfg.target_scaling_factor = distributed.broadcast_object(sae.cfg.target_scaling_factor)
        self.t_start, self.step_start = time.perf_counter(), self.step
        self.t_log, self.tokens_log = self.t_start, self.step * self.batch_size
        sae.train()

    def progress(self) -> Progress:
        """A bar on a terminal, else a line every few seconds (under `dvc repro`); only rank 0 speaks."""
        return Progress(f"train {self.sae_cfg.hook}".rstrip(), self.total_steps, unit="steps", initial=self.step,
                        tokens_per_unit=self.batch_size, enabled=self.ranks.is_main)

    def batches(self) -> Iterator[Tensor]:
        """This process's rows ``x [B / world, d_model]`` of each remaining step's batch, on the device (paired:
        ``[B / world, 2·d_model]``, input then target columns)."""
        return train_batches(self.dataset, self.batch_size, self.seed, self.step, self.total_steps, self.device,
                             self.cfg.prefetch, (0, 1) if self.shards is not None else (self.ranks.rank, self.ranks.world), target=self.target)

    def whole_batch(self) -> AbstractContextManager[None]:
        """Reductions inside see the batch of all processes (pipeline.sae.batch); latent shards each hold it whole."""
        return batch.across(1 if self.shards is not None else self.ranks.world, distributed)

    # ---- step -------------------------------------------------------------------------------------------
    def train_step(self, x: Tensor) -> None:
        """One optimizer step on ``x [B / world, d_model]`` (paired: ``[B / world, 2·d_model]``, input then target
        columns); its statistics accumulate on the device (no sync)."""
        sae, opt, step = self.sae, self.opt, self.step
        x, y = split(x, self.paired)  # y [B / world, d_model]: a transcoder's target, else None
        pair = {"target": y} if y is not None else {}
        if sae.wants_resample(step):  # relu_l1 2023 recipe (Towards Monosemanticity, "Neuron resampling")
            with self.whole_batch():  # every process resamples the same way, from the whole batch
                x_all = batch.gather_rows(x)
            revived = sae.resample_dead(x_all, opt, self.tracker.dead_mask())
            self.tracker.revive(revived)  # a resampled latent starts a fresh window
            log.info("step %d: resampled %d dead latents", step, revived.numel())
        self.lr = lr_at(step, self.total_steps, self.cfg)
        for group in opt.param_groups:
            group["lr"] = self.lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16), self.whole_batch():
            # The latents dead as the step begins (the tracker's record, the same on every process):
            # AuxK's candidates.
            out = self.loss(x, step, self.tracker.dead_mask(), **pair)
        with self.whole_batch():  # statistics of the whole batch, the same on every process: one collective,
            counts, l0 = out.firing(self.sae_cfg.d_sae)  # [d_sae], scalar: from dense latents or the sparse code
            # started now, travelling during backward (only the tracker after the step needs the global counts)
            statistics = self.stats.update_later(out.loss, y if y is not None else x, out.x_hat, l0, counts)
        opt.zero_grad(set_to_none=True)
        if self.grad_sync is not None:
            with self.grad_sync:  # each gradient's sum over the processes starts as soon as backward has it
                out.loss.backward()
        else:
            out.loss.backward()
        sae.before_optimizer_step()  # e.g. remove gradient parallel to unit-norm decoder rows
        if self.cfg.grad_clip is not None:
            if self.shards is not None:  # the norm of the whole SAE's gradient
                self.shards.clip_grad_norm_(sae, self.cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        opt.step()
        sae.after_optimizer_step()  # e.g. renormalise decoder rows

        finite = torch.isfinite(out.loss) & torch.isfinite(x).all()
        bad = ~(finite & torch.isfinite(y).all()) if y is not None else ~finite
        self.bad_step = torch.where(bad & (self.bad_step < 0), step, self.bad_step)
        self.tracker.update(statistics(), self.batch_size)  # (the FVU is of what was predicted: a transcoder's y)
        self.step += 1

    def loss(self, x: Tensor, step: int, dead: Tensor, **pair: Tensor) -> LossOutput:
        """The step's loss: the SAE's ``training_loss``, or with latent shards the sharded step."""
        if self.shards is not None:
            return self.shards.training_loss(self.sae, x, dead)
        return self.sae.training_loss(x, step, self.total_steps, dead, **pair)

    # ---- log / validate / checkpoint --------------------------------------------------------------------
    def log_validate_checkpoint(self, pbar: Progress) -> None:
        """After a step: the curve row every ``log_every`` steps, validation every ``val_every``, a checkpoint
        every ``checkpoint_every`` (the last step's are the finish's)."""
        step, cfg = self.step, self.cfg
        if step % cfg.log_every == 0 or step == self.total_steps:
            self.log_row(pbar)
        if cfg.val_every and step % cfg.val_every == 0 and step < self.total_steps:
            self.validate()
            self.sae.train()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.total_steps:
            self.checkpoint()

    def log_row(self, pbar: Progress) -> None:
        self.check_finite()
        B, step = self.batch_size, self.step
        now = time.perf_counter()
        row = {"kind": "train", "step": step, "tokens": step * B, **self.stats.read_and_reset(),
               **self.tracker.fractions(), "lr": self.lr,
               "tokens_per_s": (step * B - self.tokens_log) / max(now - self.t_log, 1e-9)}
        self.t_log, self.tokens_log = now, step * B
        self.curve.append({k: row[k] for k in CURVE_COLUMNS})
        pbar.set_postfix(loss=f"{row['loss']:.4g}", L0=f"{row['l0']:.1f}", FVU=f"{row['fvu']:.3f}",
                         tok_s=f"{row['tokens_per_s']:.3g}")
        self.emit(row)

    def validate(self, whole: SAE | None = None, gathered: bool = False) -> None:
        """Rank 0 validates. Latent shards: ``whole`` is the gathered SAE (gathered here unless ``gathered``)."""
        if self.val_dataset is None:
            return
        if self.shards is not None and not gathered:
            whole = self.shards.full_sae(self.sae)  # a collective: every process takes part
        if not self.ranks.is_main:
            return
        m = reconstruction_metrics(self.sae if whole is None else whole.to(self.device), self.val_dataset, n_tokens=self.cfg.val_tokens,
                                   batch_size=self.batch_size, device=self.device, target=self.val_target)
        self.val_row = {"kind": "val", "step": self.step, **{f"val_{k}": v for k, v in m.items()}}
        log.info("step %d validation: %s", self.step,
                 ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
        self.emit(self.val_row)

    def checkpoint(self, complete: bool = False) -> None:
        """ALL resume state in one object (:mod:`pipeline.checkpoint`), written by rank 0."""
        self.check_finite()
        sae: SAE | None = self.sae
        optim = self.opt.state_dict()
        if self.shards is not None:  # the whole SAE and optimizer state, gathered on rank 0: a one-process checkpoint
            sae, optim = self.shards.full_sae(self.sae), self.shards.gather_optimizer(self.opt, self.sae)
        if not self.ranks.is_main:
            return
        assert sae is not None and optim is not None
        step = self.step
        save_checkpoint(self.checkpoint_dir, {
            "step": step, "complete": complete, "fingerprint": self.fingerprint, "sae_cfg": sae.cfg.to_dict(),
            "model": sae.state_dict(), "optimizer": optim,
            "schedule": {"step": step, "total_steps": self.total_steps}, "rng": capture_rng(),
            "cursor": {"epoch": step // self.per_epoch, "batch": step % self.per_epoch, "world_size": self.ranks.world},
            "tracker": self.tracker.state_dict(), "stats": self.stats.state_dict(), "curve": self.curve,
            "val": self.val_row,
        })

    def check_finite(self) -> None:
        """Raise at the first non-finite step (of any process, so that all of them stop together)."""
        if self.ranks.parallel:
            first = distributed.all_reduce_(torch.where(self.bad_step < 0, self.total_steps, self.bad_step), op="min")
            bad = int(first) if int(first) < self.total_steps else -1
        else:
            bad = int(self.bad_step)
        if bad >= 0:
            raise UserError(f"train step {bad}: non-finite loss or input activations (NaN/inf) in {self.dataset.root}; "
                            f"the last good checkpoint in {self.checkpoint_dir} is kept")

    # ---- finish -----------------------------------------------------------------------------------------
    def finish(self, out_dir: Path, curve_path: Path | None) -> tuple[dict[str, Any], float]:
        """Validate, save the SAE (eval mode) and the complete checkpoint and curve; returns the summary
        (steps, tokens, d_sae, the curve's last values, val_* metrics) and the resumed part's seconds."""
        self.check_finite()
        elapsed = time.perf_counter() - self.t_start
        whole = self.shards.full_sae(self.sae) if self.shards is not None else None  # rank 0: the gathered SAE
        self.validate(whole, gathered=True)
        self.sae.eval()
        if self.ranks.is_main:
            save_sae(self.sae if whole is None else whole.eval(), out_dir, training={**dataclasses.asdict(self.cfg), "seed": self.seed,
                                                  "steps": self.total_steps, "world_size": self.ranks.world})
        self.checkpoint(complete=True)
        if curve_path is not None and self.ranks.is_main:
            write_curve(curve_path, self.curve)
        last = self.curve[-1] if self.curve else {}
        summary = {"steps": self.total_steps, "tokens": self.total_steps * self.batch_size, "d_sae": self.sae_cfg.d_sae,
                   **{name: last[k] for k, name in SUMMARY_NAMES.items() if k in last},
                   **{k: v for k, v in self.val_row.items() if k.startswith("val_")}}
        if whole is not None:
            self.sae = whole  # rank 0 returns the whole SAE
        return summary, elapsed


__all__ = ["TrainRun", "CURVE_COLUMNS", "SUMMARY_NAMES", "LogFn", "write_curve"]
