"""Training checkpoints: ALL resume state in one object, written atomically, checked on load.

A checkpoint is one ``torch.save`` dict (see :func:`save_checkpoint`) holding the SAE weights,
the optimizer state, the LR-schedule position, the RNG states (torch, CUDA, numpy, python), the
data cursor (the number of batches consumed from the seeded stream), the loop's counters and
statistics accumulators, the training curve so far, and a *fingerprint*: a flat dict of every
param that affects the trained weights, and of the numerics in force (``pipeline.numerics.numerics_fingerprint``). Resuming with a different fingerprint is refused with a
one-line error naming the changed keys, because silently continuing would mix two experiments.

Written like every persistent file here: temp name in the same directory -> fsync -> ``os.replace``,
so a run killed mid-write keeps the previous complete checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, json_digest

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_VERSION = 1


def fingerprint(**parts: Any) -> dict[str, str]:
    """Flatten nested params into ``{"train.lr": "0.001", ...}`` (values as canonical JSON strings).

    Strings rather than floats so that comparisons are exact and the checkpoint stays loadable
    with ``weights_only=True``.
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value):
                walk(f"{prefix}.{k}" if prefix else str(k), value[k])
        else:
            flat[prefix] = json.dumps(value, sort_keys=True, default=str)

    walk("", parts)
    return flat


def fingerprint_digest(fp: dict[str, str]) -> str:
    return json_digest(fp)


def capture_rng() -> dict[str, Any]:
    """Every RNG the loop (or an SAE's resampling) might draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (see module docstring) as ``<directory>/state.pt`` atomically."""
    path = Path(directory) / CHECKPOINT_FILE
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(directory: str | Path, expected: dict[str, str], world_size: int = 1) -> dict[str, Any] | None:
    """The unfinished run's checkpoint in ``directory``; refuse it if its fingerprint differs from ``expected``
    or if it was written by a run of another number of data-parallel processes than ``world_size``.

    Returns None when there is nothing to resume from: no checkpoint, or a *finished* run (so a
    new experiment, or a rerun after a code change, trains from scratch). Tensors are loaded on CPU; the caller
    moves them (``load_state_dict`` does it for the model and optimizer).
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        # numpy/python RNG states are plain tuples/arrays; weights_only=False is needed for them.
        # The file is our own output under checkpoints/, never a downloaded artefact.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated by something other than us, or a different format
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format {state.get('version') if isinstance(state, dict) else '?'} "
                        f"is not {CHECKPOINT_VERSION}; delete it to start over")
    old: dict[str, str] = state["fingerprint"]
    changed = sorted(k for k in set(old) | set(expected) if old.get(k) != expected.get(k))
    if state.get("complete"):
        # A finished run is never resumed: DVC reruns the stage only when code, data or params
        # changed (or with --force), and then a fresh run is what is wanted.
        log.info("%s: previous run finished; training from scratch", path)
        return None
    # Checked first: another process count usually brings another thread count per process (in the
    # fingerprint's numerics), and the count is the cause to name.
    written_by = int(state.get("cursor", {}).get("world_size", 1))
    if written_by != world_size:
        # The data stream is the same for any world size, but the float summation order is not: resuming on
        # another number of processes would continue to nearly, not exactly, the same weights.
        # Every process finds this alike: shown once (by rank 0), not once per process.
        raise distributed.EveryRankError(
            f"{path}: written by a run of {distributed.plural(written_by)}, this run has {world_size}; resume with "
            f"{distributed.plural(written_by)} (train.processes or torchrun --nproc-per-node), or delete "
            f"{Path(directory)} to start over")
    if changed:
        shown = ", ".join(f"{k} ({old.get(k, 'absent')} -> {expected.get(k, 'absent')})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UserError(f"{path}: cannot resume, params changed since the checkpoint: {shown}{more}; "
                        f"delete {Path(directory)} to start over")
    log.info("resuming from %s at step %d", path, state["step"])
    return state


def resume_state(directory: Path, expected: dict[str, str], ranks: distributed.Ranks) -> dict[str, Any] | None:
    """:func:`load_checkpoint` for every process of the run, the file read once: by rank 0, which sends the state
    to the others (a broadcast), so N processes do not each read, and hold while unpickling, the whole checkpoint
    (on several machines the others need no copy of ``directory`` at all).

    Data-parallel, first :func:`same_start`. A refusal found by rank 0 (another process count, changed params,
    an unreadable file) is raised on every process as an :class:`EveryRankError`: one line, rank 0's.
    """
    if not ranks.parallel:
        return load_checkpoint(directory, expected, 1)
    same_start(ranks, expected, directory)
    found: tuple[str, Any] = ("none", None)
    if ranks.is_main:
        try:
            found = ("state", load_checkpoint(directory, expected, ranks.world))
        except UserError as e:
            found = ("error", str(e))
    kind, value = distributed.broadcast_object(found)
    if kind == "error":
        raise distributed.EveryRankError(value)
    return value


def same_start(ranks: distributed.Ranks, fp: dict[str, str], directory: Path) -> None:
    """Data-parallel: refuse to start unless this process sees rank 0's inputs (``fp``).

    On several machines each process reads its own copy of the activations; one with other data would silently
    train something else. (The checkpoint needs no copy: :func:`resume_state` sends rank 0's.)
    """
    mine = fingerprint_digest(fp)
    main = distributed.broadcast_object(mine)
    if mine != main:
        raise UserError(f"{directory}: process {ranks.rank} sees inputs {mine}; rank 0 sees inputs {main}: every "
                        f"process needs the same activations (dvc pull)")


__all__ = ["CHECKPOINT_FILE", "resume_state", "same_start", "capture_rng", "restore_rng", "fingerprint", "fingerprint_digest",
           "save_checkpoint", "load_checkpoint"]
