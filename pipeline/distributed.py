"""Data-parallel processes under torchrun: who this process is, its device, the process group, collectives.

``torchrun`` (or a stage relaunching itself, :mod:`stages.launch`) starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`start` joins
them into one process group (gloo on CPU, NCCL on CUDA), gives each process the GPU of its local rank, and
leaves logging to rank 0. Without torchrun it changes nothing: a world of one process.

Every collective goes through this module, so that one failing process shows one error line: its own. The
others' collectives then fail with the backend's "connection closed" traceback; here that becomes
:class:`PeerLost`, a one-line :class:`UserError` pointing at the first process's error. An error every process
finds alike (a bad param, a checkpoint of another process count) is an :class:`EveryRankError`: rank 0 alone
shows it. A launched process dies with its launcher (:func:`die_with_launcher`): a ``kill -9`` of ``sae train``
or of torchrun leaves no process training.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.devices import resolve_device
from pipeline.errors import EveryRankError, UserError

log = logging.getLogger(__name__)


class PeerLost(UserError):
    """A collective failed: another process of the run stopped (or could not be reached)."""

    follows_another = True  # sae's launcher names the process that failed first instead (pipeline.errors.shown_here)


def plural(n: int, word: str = "process") -> str:
    """``1 process``, ``2 processes``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher() -> None:
    """Ask the kernel to SIGKILL this process when its parent (torchrun's agent, or ``sae train`` relaunched)
    dies, however it dies: a launcher killed with ``kill -9`` cannot stop its workers itself, and without this
    they would go on training and writing checkpoints. Linux only (elsewhere a no-op).

    The parent may already be gone by the time this runs (the process is then adopted by init or a subreaper):
    ``sae train`` relaunching itself names its pid in ``SAE_LAUNCHER_PID``, and a process whose parent is no
    longer that one exits at once. (Under a bare torchrun the parent is whoever it is now.)"""
    if not sys.platform.startswith("linux"):
        return
    parent = int(os.environ.get("SAE_LAUNCHER_PID", "0")) or os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: an exotic libc; the launcher's own cleanup still applies
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")
        return
    if os.getppid() != parent:  # died between our start and the prctl: nobody will signal us
        os._exit(1)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes checkpoints, models, curves and metrics."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    """The run this process has joined (:func:`start`), or a world of one."""
    if not dist.is_available() or not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def start(device_name: str, key: str) -> tuple[Ranks, torch.device]:
    """Join the launcher's process group (once per process) and resolve ``device_name`` for this process.

    Under torchrun a CUDA device is the GPU of the local rank (``auto`` and ``cuda`` both mean that; a pinned
    ``cuda:N`` would put every process on one GPU and is refused naming ``key``). Without torchrun this is
    :func:`pipeline.devices.resolve_device`.
    """
    device = resolve_device(device_name, key)
    if not launched():
        return Ranks(), device
    die_with_launcher()
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"{key}: {device_name!r} pins one GPU, but this run has {ranks.world} processes, each on "
                            f"the GPU of its local rank; use auto or cuda")
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(f"{key}: local rank {ranks.local_rank} needs a GPU of its own, "
                            f"but {torch.cuda.device_count()} are visible")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log; warnings and errors still show from every rank
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_stop)
        log.info("%d processes joined (%s)", ranks.world, backend)
    return ranks, device


def _stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError and gloo's "connection closed by peer" are RuntimeErrors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        me = current()
        raise PeerLost(f"process {me.rank} of {me.world}: {what} failed ({first}); another process of this run "
                       f"stopped first: its error is above") from None


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all processes (``op``: sum, min or max); returns ``t``. Bool tensors are not supported."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    _collective("all_reduce", dist.all_reduce, t, op=ops[op])
    return t


def all_reduce_later(t: torch.Tensor) -> Any:
    """Start summing ``t`` over all processes in place; returns a function that waits for the sum and returns ``t``.
    ``t`` must not be touched until then (the backend reads and writes it meanwhile)."""
    work = _collective("all_reduce", dist.all_reduce, t, async_op=True)

    def wait() -> torch.Tensor:
        _collective("all_reduce", work.wait)
        return t

    return wait


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [n, ...]`` of every process (same shape on each), concatenated in rank order: ``[world * n, ...]``."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    _collective("all_gather", dist.all_gather, parts, t.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every process."""
    box = [obj]
    _collective("broadcast", dist.broadcast_object_list, box, src=0)
    return box[0]


def broadcast_tensors_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place (e.g. a module's parameters and buffers)."""
    for t in tensors:
        _collective("broadcast", dist.broadcast, t.detach(), src=0)  # detach: same storage, not an autograd op


def sum_gradients_(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over all processes, in place; all launched before the first wait.

    A sum, not DDP's mean: each process backpropagates the *global* loss through its own rows
    (:mod:`pipeline.sae.batch`), so the sum is the one-process gradient of the whole batch.
    """
    works = [_collective("all_reduce", dist.all_reduce, p.grad, async_op=True) for p in params if p.grad is not None]
    for w in works:
        _collective("all_reduce", w.wait)


class GradientSync:
    """Sum each parameter's gradient over all processes while backward still runs (DDP's overlap, without DDP).

    ``with sync: loss.backward()``: a hook on every parameter (``register_post_accumulate_grad_hook``) starts the
    asynchronous all-reduce of its gradient as soon as backward has accumulated it, so the sums of the decoder's
    gradients travel while the encoder's are computed; leaving the block waits for all of them. The result is
    :func:`sum_gradients_`'s, bit for bit (the same sums, only started earlier).

    The collectives must be issued in the same order on every process (gloo and NCCL match them by order), so
    they start in one fixed order: the first block only records the order in which backward produced the
    gradients (its sums start at the end, in ``params`` order) and rank 0's record becomes everyone's order, as
    DDP rebuilds its buckets after the first iteration. A gradient ready before its turn waits for those before
    it in that order. Outside the block the hooks do nothing.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.order: list[int] | None = None  # indices into params; None until the first block has recorded it
        self._seen: list[int] = []
        self._ready: set[int] = set()
        self._next = 0  # position in order of the first gradient whose sum has not started
        self._works: list[Any] = []
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self._index[id(p)]
        if self.order is None:
            self._seen.append(i)
            return
        self._ready.add(i)
        self._launch(only_ready=True)

    def _launch(self, only_ready: bool) -> None:
        order = self.order if self.order is not None else list(range(len(self.params)))
        while self._next < len(order) and (order[self._next] in self._ready or not only_ready):
            grad = self.params[order[self._next]].grad
            if grad is not None:  # no gradient on one process means none on any: the graphs are the same
                self._works.append(_collective("all_reduce", dist.all_reduce, grad, async_op=True))
            self._next += 1

    def __enter__(self) -> GradientSync:
        self._ready, self._seen, self._next, self._works, self._armed = set(), [], 0, [], True
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self._armed = False
        if kind is not None:  # backward raised: nothing to wait for that matters
            return
        self._launch(only_ready=False)  # the first block's sums, and those of parameters backward did not reach
        for w in self._works:
            _collective("all_reduce", w.wait)
        self._works = []
        if self.order is None:
            seen = self._seen + [i for i in range(len(self.params)) if i not in self._seen]
            self.order = broadcast_object(seen)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def barrier() -> None:
    """Wait until every process gets here (a no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        _collective("barrier", dist.barrier)


__all__ = ["Ranks", "PeerLost", "EveryRankError", "plural", "die_with_launcher", "launched", "current", "start", "all_reduce_", "all_reduce_later", "all_gather_rows", "broadcast_object",
           "broadcast_tensors_", "sum_gradients_", "GradientSync", "barrier"]
