"""Transcoder pairs: which hooks a transcoder reads and predicts, and the check that the two datasets hold the same rows.

A transcoder (:mod:`pipeline.sae.transcoder`) reads block i's MLP input ``layers.{i}.mlp_in`` and predicts the same
block's MLP output ``layers.{i}.mlp_out``. ``sae train`` with ``sae.arch: transcoder`` trains one per pair of
``extract.hooks`` into the directory of its input hook; the other hooks (the ``mlp_out`` targets among them) get no
SAE of their own. Extraction writes both hooks of a forward with the same rows (context id, position, token id), in
the same shard and row-group layout, so the training stream (:mod:`pipeline.lanes`) cuts both datasets the same way
and reads them in lockstep: the target row of every input row is its own MLP's output. :func:`check_aligned` checks
the layouts once, before training; :func:`check_rows` each batch's rows (cheap, a few integer columns), so a pair
off by even one row stops at the first batch instead of training on mismatched targets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.activations import ActivationDataset
from pipeline.activations.reader import ActivationBatch
from pipeline.errors import UserError
from pipeline.hooks import parse_hook

log = logging.getLogger(__name__)

TRANSCODER_ARCHS = ("transcoder",)  # sae.arch values that train on (mlp_in, mlp_out) pairs
# Manifest fields two datasets of one extraction share: the same model, data and split.
SHARED_FIELDS = ("n_tokens", "d_model", "dtype", "model_id", "revision", "corpus", "split", "context_length")


def is_transcoder_arch(arch: str) -> bool:
    return arch in TRANSCODER_ARCHS


def output_hook(hook_in: str) -> str:
    """``layers.{i}.mlp_in`` -> ``layers.{i}.mlp_out`` (UserError for any other hook)."""
    hp = parse_hook(hook_in)
    if hp.kind != "mlp_in":
        raise UserError(f"hook {hook_in!r}: a transcoder reads layers.{{i}}.mlp_in")
    return f"layers.{hp.layer}.mlp_out"


def transcoder_pairs(hooks: Sequence[str]) -> dict[str, str]:
    """``{mlp_in hook: mlp_out hook}`` for ``extract.hooks`` (in their order); one-line UserError for an ``mlp_in``
    without its ``mlp_out``, or when there is no pair at all."""
    pairs: dict[str, str] = {}
    for hook in hooks:
        if parse_hook(hook).kind != "mlp_in":
            continue
        out = output_hook(hook)
        if out not in hooks:
            raise UserError(f"extract.hooks: {hook!r} has no target: sae.arch 'transcoder' predicts the MLP output "
                            f"from its input; add {out!r} to extract.hooks")
        pairs[hook] = out
    if not pairs:
        why = "sae.arch 'transcoder' trains on (MLP input, MLP output) pairs"
        outs = [h for h in hooks if parse_hook(h).kind == "mlp_out"]
        if outs:
            raise UserError(f"extract.hooks: {outs[0]!r} has no input: {why}; add "
                            f"'layers.{parse_hook(outs[0]).layer}.mlp_in' to extract.hooks")
        raise UserError(f"extract.hooks: no layers.{{i}}.mlp_in hook: {why}; add a pair to extract.hooks, e.g. "
                        "'layers.1.mlp_in' and 'layers.1.mlp_out'")
    return pairs


def sae_hooks(arch: str, hooks: Sequence[str]) -> list[str]:
    """The hooks that get an SAE directory ``models/sae/<hook>/``: every hook, or for a transcoder the input hook
    of each pair (the others are logged as skipped)."""
    if not is_transcoder_arch(arch):
        return list(hooks)
    pairs = transcoder_pairs(hooks)
    skipped = [h for h in hooks if h not in pairs]
    if skipped:
        log.info("sae.arch %s: no dictionary of its own for %s (a transcoder per (mlp_in, mlp_out) pair, in the "
                 "mlp_in hook's directory)", arch, ", ".join(skipped))
    return list(pairs)


def saved_dictionaries(models: Path, hooks: Sequence[str]) -> dict[str, str]:
    """``{hook: what its dictionary reconstructs}`` for the dictionaries of ``hooks`` saved under ``models/<hook>/``:
    an SAE its own hook, a transcoder its ``hook_out`` (``layers.{i}.mlp_out``). Beside transcoders, a hook without a
    directory is left out (training gave it none: its target, or a hook outside every pair); without any, every
    hook is kept (a missing directory is then the loader's error)."""
    from pipeline.sae.io import read_sae_cfg

    found = {h: read_sae_cfg(models / h)[0] for h in hooks if (models / h).is_dir()}
    target = {h: (cfg.hook_out or output_hook(h)) if is_transcoder_arch(cfg.arch) else h for h, cfg in found.items()}
    if not any(t != h for h, t in target.items()):
        return {h: h for h in hooks}
    if skipped := [h for h in hooks if h not in found]:
        log.info("no dictionary of its own for %s (transcoders in %s)", ", ".join(skipped), models)
    return target


def check_aligned(x: ActivationDataset, y: ActivationDataset) -> None:
    """One-line UserError unless ``y`` (the target) holds ``x``'s rows in ``x``'s layout: the manifests agree
    (:data:`SHARED_FIELDS`), the shards hold the same rows and the row groups the same counts (footers only)."""
    def refuse(why: str) -> UserError:
        return UserError(f"{y.root}: not aligned with {x.root} ({why}); a transcoder's target must hold its input's "
                         f"rows: run `sae extract` with both hooks in extract.hooks")

    mx, my = x.manifest, y.manifest
    for name in SHARED_FIELDS:
        if getattr(mx, name) != getattr(my, name):
            raise refuse(f"{name} {getattr(my, name)!r} != {getattr(mx, name)!r}")
    if [s.rows for s in mx.shards] != [s.rows for s in my.shards]:
        raise refuse("rows per shard differ")
    if x.row_groups() != y.row_groups():
        raise refuse("row groups differ")


def check_rows(x: ActivationBatch, y: ActivationBatch, x_root: object, y_root: object) -> None:
    """One-line UserError at the first row whose (context id, position, token id) differ between input and target."""
    same = (x.context_id == y.context_id) & (x.position == y.position) & (x.token_id == y.token_id)  # [B]
    if not bool(same.all()):
        i = int((~same).nonzero()[0, 0])
        raise UserError(f"{y_root}: row not aligned with {x_root}: target (context {int(y.context_id[i])}, position "
                        f"{int(y.position[i])}) for input (context {int(x.context_id[i])}, position "
                        f"{int(x.position[i])}); run `sae extract` with both hooks in extract.hooks")


def joined(x: ActivationBatch, y: ActivationBatch) -> torch.Tensor:
    """A paired training batch ``[B, 2·d_model]``: input columns then target columns (one tensor: one pinned copy and
    one device transfer per step; :func:`split` takes it apart)."""
    return torch.cat([x.acts, y.acts], dim=1)


def split(xy: torch.Tensor, paired: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``xy [B, 2·d]`` -> (input ``[B, d]``, target ``[B, d]``); unpaired ``[B, d]`` -> (itself, None)."""
    if not paired:
        return xy, None
    d = xy.shape[1] // 2
    return xy[:, :d], xy[:, d:]


__all__ = ["TRANSCODER_ARCHS", "is_transcoder_arch", "output_hook", "transcoder_pairs", "sae_hooks", "saved_dictionaries",
           "check_aligned", "check_rows", "joined", "split"]
