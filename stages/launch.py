"""``train.processes`` / ``extract.processes``: a stage asked for N processes starts them itself.

``sae train`` with ``train.processes: 4`` (dvc.yaml's ``cmd`` stays ``sae train``) runs its own command line in
4 processes under PyTorch's elastic launcher, as ``torchrun --standalone --nproc-per-node 4 --no-python sae train
...`` would, and waits for them. Under torchrun already (``LOCAL_RANK`` and ``WORLD_SIZE`` set) the setting is
ignored: the launcher decides. Each process prints its own errors (one shared by all, once); a failed run exits
with the code of the process that failed first, without the launcher's traceback. A SIGTERM or Ctrl-C stops every
process and prints one line; a ``kill -9`` of this process takes them with it
(:func:`pipeline.distributed.die_with_launcher`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Literal

import click
import torch

from pipeline import distributed

log = logging.getLogger("sae")


def processes(setting: int | Literal["auto"], device: str) -> int:
    """``auto``: one per visible GPU, 1 without CUDA or on an explicit CPU device."""
    if setting != "auto":
        return setting
    return torch.cuda.device_count() if torch.cuda.is_available() and not device.startswith("cpu") else 1


def command_line(ctx: click.Context) -> list[str]:
    """The options of the running click command, as a command line that gives the same ``ctx.params``."""
    argv: list[str] = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name or "")
        if not isinstance(p, click.Option) or value is None or value == p.default:
            continue
        flag = max(p.opts, key=len)  # the long form
        if p.is_flag:
            argv += [flag] if value else [p.secondary_opts[0]] if p.secondary_opts else []
            continue
        argv += [x for v in (value if p.multiple else [value]) for x in (flag, str(v))]
    return argv


def relaunched(stage: str, setting: int | Literal["auto"], device: str) -> bool:
    """Run this stage in ``processes(setting, device)`` processes if that is more than one and no launcher did.

    Returns True when it ran them (the caller has nothing left to do); False to go on in this process.
    Raises ``SystemExit`` with the first failed process's exit code.
    """
    n = processes(setting, device)
    if n <= 1 or distributed.launched():
        return False
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = ["-m", "stages", stage, *command_line(click.get_current_context())]
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun's default is 1 thread; share the cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    os.environ["SAE_LAUNCHER_PID"] = str(os.getpid())  # the workers' parent: they die with it
    # The launcher logs each failure at length; the failed process has already printed its one-line error.
    # Its modules set their loggers' levels themselves (torch's elastic get_logger), so each one is quietened.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1)
    log.info("%s: starting %d processes (%s.processes)", stage, n, stage)
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: it printed nothing, and the others' lost-peer lines are hidden
            click.echo(f"error: {stage}: process {rank} of {n} was killed by {signal.Signals(-failure.exitcode).name}; "
                       f"completed work is kept, rerun to resume", err=True)
        raise SystemExit(failure.exitcode if failure.exitcode > 0 else 1) from None
    except SignalException as e:  # the launcher has already stopped the processes (SIGTERM, then SIGKILL)
        what = "interrupted" if e.sigval == signal.SIGINT else f"error: {stage}: stopped by {e.sigval.name}"
        click.echo(f"{what}: the {n} processes were stopped; completed work is kept, rerun to resume", err=True)
        raise SystemExit(128 + int(e.sigval)) from None
    return True
