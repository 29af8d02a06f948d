"""Latent-dimension sharding (tensor parallelism over d_sae): ``train.parallel: latents`` under N processes.

For SAEs whose training state (``32·d_in·d_sae`` bytes: README "Memory per GPU") does not fit one device. Process
``r`` of ``N`` holds the contiguous slice ``[r·m/N, (r+1)·m/N)`` of the ``m`` latents: ``W_enc[:, slice]``,
``b_enc[slice]``, ``W_dec[slice, :]`` and their gradients and Adam moments; ``b_dec`` and BatchTopK's inference
threshold are replicated (every process computes the same loss, so their gradients and updates are bit-for-bit
the same everywhere: no all-reduce). Every process reads the whole batch (the activation reads are repeated N
times; the SAE, not the data, is what is too large). The step is :mod:`pipeline.sharding_step`.

The seeded initialisation is drawn whole on the host CPU, once per process, and sliced, so that any N starts
from the one-process weights. Checkpoints and the saved SAE are whole: rank 0 gathers the slices (one at a time,
to the host) and writes the one-process layout (``models/sae/<hook>/sae.safetensors`` is the same file a
one-process run writes); on resume each process reads it and keeps its slice. Resuming needs the same number of
processes (one line otherwise, as for data-parallel runs), since the float summation order depends on N.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline import distributed, sharding_step
from pipeline.errors import EveryRankError
from pipeline.params.sae import TrainParams
from pipeline.sae import SAE, SAEConfig, make_sae
from pipeline.sae.topk import TopKSAE

SHARDED_ARCHS = ("topk", "batchtopk")
#: the sharded parameters and the dimension of their latents; every other tensor is replicated
SHARD_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


def check(sae_cfg: SAEConfig, cfg: TrainParams, world: int) -> None:
    """Refuse what latent sharding does not support, with one line every process finds alike."""
    if sae_cfg.arch not in SHARDED_ARCHS:
        raise EveryRankError(f"train.parallel: latents shards sae.arch {' and '.join(SHARDED_ARCHS)}, not "
                             f"{sae_cfg.arch!r}; use train.parallel: data")
    if sae_cfg.d_sae % world:
        raise EveryRankError(f"train.parallel: latents: sae.d_sae {sae_cfg.d_sae} is not divisible by the {world} "
                             f"training processes")
    if cfg.kernels in ("triton", "sparse"):
        raise EveryRankError(f"train.kernels: {cfg.kernels!r} is not available with train.parallel: latents (its step "
                             f"is the dense PyTorch one); use auto or torch")


def plan(sae_cfg: SAEConfig, cfg: TrainParams, ranks: distributed.Ranks) -> LatentShards | None:
    """This process's slice under ``train.parallel: latents`` with several processes, else None (whole SAE)."""
    if cfg.parallel != "latents" or not ranks.parallel:
        return None
    check(sae_cfg, cfg, ranks.world)
    return LatentShards(sae_cfg, ranks.rank, ranks.world)


def _broadcast(t: Tensor, src: int) -> None:
    try:
        dist.broadcast(t, src=src)
    except RuntimeError as e:  # as pipeline.distributed's collectives: one line naming the cause
        me = distributed.current()
        raise distributed.PeerLost(f"process {me.rank} of {me.world}: broadcast failed ({str(e).strip()[:200]}); "
                                   f"another process of this run stopped first: its error is above") from None


@dataclass(frozen=True)
class LatentShards:
    """Process ``rank`` of ``world``'s slice of the SAE ``cfg`` (the whole SAE's config)."""

    cfg: SAEConfig
    rank: int
    world: int

    @property
    def width(self) -> int:
        return self.cfg.d_sae // self.world

    @property
    def lo(self) -> int:
        return self.rank * self.width

    @property
    def k_aux(self) -> int:
        """The whole SAE's ``TopKSAE.k_aux`` (the slice's own would be capped at its width)."""
        k = self.cfg.k_aux if self.cfg.k_aux is not None else self.cfg.d_in // 2
        return max(1, min(k, self.cfg.d_sae))

    def local_cfg(self) -> SAEConfig:
        return SAEConfig.from_dict({**self.cfg.to_dict(), "d_sae": self.width, "k": min(self.cfg.k, self.width)})

    # ---- slicing ------------------------------------------------------------------------------------------
    def slice_model(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A whole SAE's ``state_dict`` -> this slice's."""
        return {n: t.narrow(SHARD_DIMS[n], self.lo, self.width).clone() if n in SHARD_DIMS else t
                for n, t in state.items()}

    def slice_optimizer(self, state: dict[str, Any], names: list[str]) -> dict[str, Any]:
        """A whole SAE's optimizer ``state_dict`` (parameters in ``names`` order) -> this slice's."""
        out = copy.copy(state)
        out["state"] = {i: {key: v.narrow(SHARD_DIMS[names[i]], self.lo, self.width).clone()
                            if names[i] in SHARD_DIMS and v.dim() > 0 else v for key, v in s.items()}
                        for i, s in state["state"].items()}
        return out

    def make_local(self, seed: int, device: torch.device) -> SAE:
        """This slice of the seeded one-process initialisation (drawn whole on the host), on ``device``."""
        full = make_sae(SAEConfig.from_dict(self.cfg.to_dict()), seed=seed)
        local = make_sae(self.local_cfg(), seed=seed)  # the shapes; its values are replaced
        local.load_state_dict(self.slice_model(full.state_dict()))
        return local.to(device)

    def replicated(self, sae: SAE) -> list[Tensor]:
        """The tensors every process holds whole (``b_dec``, buffers)."""
        return [t for n, t in [*sae.named_parameters(), *sae.named_buffers()] if n not in SHARD_DIMS]

    def load(self, sae: SAE, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """A whole checkpoint's model and optimizer state -> this slice's."""
        sae.load_state_dict(self.slice_model(state["model"]))
        opt.load_state_dict(self.slice_optimizer(state["optimizer"], [n for n, _ in sae.named_parameters()]))

    # ---- gathering (collectives: every process calls them) --------------------------------------------------
    def gather(self, t: Tensor, dim: int) -> Tensor | None:
        """The slices of ``t`` concatenated along ``dim`` in rank order, on the host of rank 0 (None elsewhere).
        One slice travels at a time, so no device ever holds more than its own slice and one other."""
        parts = []
        for r in range(self.world):
            buf = t.detach().contiguous().clone() if r == self.rank else torch.empty_like(t.detach().contiguous())
            _broadcast(buf, r)
            if self.rank == 0:
                parts.append(buf.cpu())
        return torch.cat(parts, dim) if self.rank == 0 else None

    def gather_model(self, sae: SAE) -> dict[str, Tensor] | None:
        state = sae.state_dict()
        whole = {n: self.gather(t, SHARD_DIMS[n]) if n in SHARD_DIMS else t.detach().cpu() for n, t in state.items()}
        return whole if self.rank == 0 else None  # type: ignore[return-value]

    def gather_optimizer(self, opt: torch.optim.Optimizer, sae: SAE) -> dict[str, Any] | None:
        names = [n for n, _ in sae.named_parameters()]
        state = opt.state_dict()
        out = copy.copy(state)
        out["state"] = {i: {key: self.gather(v, SHARD_DIMS[names[i]]) if names[i] in SHARD_DIMS and v.dim() > 0
                            else v.cpu() for key, v in sorted(s.items())} for i, s in sorted(state["state"].items())}
        return out if self.rank == 0 else None

    def full_sae(self, sae: SAE) -> SAE | None:
        """The whole SAE on rank 0's host (None elsewhere), in ``sae``'s training mode."""
        state = self.gather_model(sae)
        if state is None:
            return None
        full = make_sae(SAEConfig.from_dict({**self.cfg.to_dict(), "scaling_factor": sae.cfg.scaling_factor}), seed=0)
        full.load_state_dict(state)
        full.kernel_backend = "torch"
        return full.train(sae.training)

    # ---- the step ---------------------------------------------------------------------------------------
    def training_loss(self, sae: SAE, x: Tensor, dead: Tensor) -> sharding_step.ShardedLoss:
        """The loss on the whole batch ``x [B, d_in]`` (:func:`pipeline.sharding_step.training_loss`)."""
        assert isinstance(sae, TopKSAE)
        return sharding_step.training_loss(sae, x, dead, self.cfg.k, self.k_aux, self.lo, self.rank)

    @torch.no_grad()
    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole SAE: the slices' squared norms summed over processes,
        the replicated parameters' counted once. Returns the total norm."""
        sq = {True: [], False: []}  # sharded?
        for n, p in sae.named_parameters():
            if p.grad is not None:
                sq[n in SHARD_DIMS].append(p.grad.float().pow(2).sum())
        zero = torch.zeros((), device=sae.b_dec.device)
        sharded = distributed.all_reduce_(torch.stack(sq[True]).sum() if sq[True] else zero.clone())
        total = (sharded + (torch.stack(sq[False]).sum() if sq[False] else zero)).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in sae.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total


__all__ = ["SHARDED_ARCHS", "SHARD_DIMS", "LatentShards", "check", "plan"]
