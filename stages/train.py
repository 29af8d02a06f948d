"""``sae train``: one SAE per hook, from ``data/activations/train/<hook>/`` to ``models/sae/<hook>/``.

Writes ``models/sae/<hook>/sae.safetensors`` + ``cfg.json``, ``plots/train/<hook>.csv`` (the
training curve), ``metrics/train.json`` and resumable checkpoints under ``checkpoints/<hook>/``.
With ``sae.arch: transcoder``, one transcoder per (``layers.{i}.mlp_in``, ``layers.{i}.mlp_out``) pair of
``extract.hooks``, trained on both datasets in lockstep, keyed by the input hook (``pipeline.pairs``); the
other hooks get no SAE.
With ``--data DIR --out DIR`` it trains on any activation dataset instead (bring your own; see
README, "Training on your own activations"; a transcoder adds ``--target-data DIR``).
Under torchrun, or with ``train.processes`` > 1, the processes train each SAE together (data-parallel,
``pipeline.train``); rank 0 alone writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from pipeline import distributed
from pipeline.activations import open_activations
from pipeline.errors import UserError
from pipeline.headline import write_stage_results
from pipeline.pairs import is_transcoder_arch, sae_hooks, transcoder_pairs
from pipeline.params import Params
from pipeline.paths import ACTIVATIONS, MODELS, TRAIN_CURVES
from stages.common import stage_command
from stages.launch import relaunched

log = logging.getLogger("sae.train")

CHECKPOINTS = Path("checkpoints")


def check_validation_data(params: Params) -> None:
    """``train.val_every`` > 0 asks for validation: a hook without its validation dataset is an error before any
    hook trains (silently skipping it would drop the val_* entries from ``metrics/train.json``)."""
    for hook in params.extract.hooks if params.train.val_every > 0 else ():
        manifest = ACTIVATIONS / "validation" / hook / "manifest.json"
        if not manifest.is_file():
            raise UserError(f"{manifest}: missing input (train.val_every is {params.train.val_every}): run `sae extract` "
                            "with a validation split (corpus.validation_fraction > 0), or set train.val_every: 0 to "
                            "train without validation")


def import_source(params: Params) -> None:
    """``sae.source`` is a published SAE: write it to ``models/sae/<hook>/`` as training would, with its
    ``provenance.json``; ``metrics/train.json`` records the source (strings under ``source``) instead of a run."""
    from pipeline.environment import environment
    from pipeline.sae.published import import_published, source_versions

    d_model = {h: open_activations(ACTIVATIONS / "train" / h).d_model for h in params.extract.hooks
               if (ACTIVATIONS / "train" / h / "manifest.json").is_file()}
    prov = import_published(params.sae.source, params.sae.source_format, params.extract.hooks, params.model.name,
                            d_model, MODELS)
    TRAIN_CURVES.mkdir(parents=True, exist_ok=True)  # declared outputs: nothing trained, so nothing in them
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        prov["hook"]: {"imported": 1, "d_in": prov["d_in"], "d_sae": prov["d_sae"]},
        "source": {k: prov[k] for k in ("source", "format", "architecture", "digest", "source_hook", "source_model")},
        # the packages that read the files, besides the environment's own list
        "environment": environment({"numerics.portable": params.numerics.portable, **source_versions()}),
    }
    write_stage_results("train", metrics, [prov["hook"]])


@click.option("--val-target-data", "val_target_data", type=click.Path(file_okay=False, exists=True), default=None,
              help="With --val-data and sae.arch transcoder: the MLP outputs of --val-data's MLP inputs.")
@click.option("--target-data", "target_data", type=click.Path(file_okay=False, exists=True), default=None,
              help="With --data and sae.arch transcoder: the MLP outputs of --data's MLP inputs, row for row.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="With --data: folder for sae.safetensors + cfg.json (default: models/sae/<hook of the dataset>).")
@click.option("--val-data", "val_data", type=click.Path(file_okay=False, exists=True), default=None,
              help="With --data: a held-out activation dataset for validation.")
@click.option("--data", "data", type=click.Path(file_okay=False, exists=True), default=None,
              help="Train on this activation dataset (a folder with manifest.json) instead of the pipeline's.")
@stage_command(help="Activation datasets -> one trained SAE per hook (resumes from checkpoints/ after a kill).")
def command(params: Params, data: str | None = None, val_data: str | None = None, out: str | None = None,
            target_data: str | None = None, val_target_data: str | None = None) -> None:
    from pipeline.devices import resolve_device
    from pipeline.environment import environment
    from pipeline.numerics import apply_numerics
    from pipeline.train import train_hook, train_on_dataset
    from pipeline.train_setup import resolve_auto

    if data is None and (val_data or out or target_data or val_target_data):
        raise click.UsageError("--target-data, --val-target-data, --val-data and --out need --data")
    if data is not None and is_transcoder_arch(params.sae.arch) and not target_data:
        raise UserError("--target-data: missing; sae.arch 'transcoder' trains on the MLP outputs of --data's MLP "
                        "inputs, row for row (a dataset written with the same rows)")
    if data is None and params.sae.source != "train":  # a published SAE: imported, not trained
        import_source(params)
        return
    hooks: list[str] = []
    if data is None:
        hooks = sae_hooks(params.sae.arch, params.extract.hooks)  # a transcoder without its pair: refused here
        check_validation_data(params)
    if relaunched("train", params.train.processes, params.train.device):  # train.processes > 1: ran as N processes
        return
    distributed.start(params.train.device, "train.device")  # under torchrun: join now, and only rank 0 logs
    apply_numerics(params.numerics.portable, params.numerics.threads)
    train_p = resolve_auto(params.train, params.sae.arch)  # 'auto' dtype and kernels decided once, recorded below
    if data is not None:
        dataset = open_activations(data)
        out_dir = Path(out) if out else MODELS / dataset.hook
        summary = train_on_dataset(data, out_dir, params.sae, train_p, params.seed, val_data=val_data,
                                   checkpoint_dir=out_dir / "checkpoints", curve_path=out_dir / "train_curve.csv",
                                   target_data=target_data, val_target_data=val_target_data)
        log.info("saved %s: %s", out_dir, summary)
        return

    metrics: dict[str, Any] = {}
    pairs = transcoder_pairs(params.extract.hooks) if is_transcoder_arch(params.sae.arch) else {}
    for hook in hooks:
        dataset = open_activations(ACTIVATIONS / "train" / hook)
        val_root = ACTIVATIONS / "validation" / hook
        val = open_activations(val_root) if (val_root / "manifest.json").is_file() else None
        target = val_target = None
        if hook in pairs:  # a transcoder: its MLP output, row for row, in both splits
            target = open_activations(ACTIVATIONS / "train" / pairs[hook])
            val_target = open_activations(ACTIVATIONS / "validation" / pairs[hook]) if val is not None else None
        metrics[hook] = train_hook(dataset, val, MODELS / hook, CHECKPOINTS / hook, TRAIN_CURVES / f"{hook}.csv",
                                   params.sae, train_p, params.seed, target, val_target)
    metrics["environment"] = environment({"train.device": resolve_device(train_p.device), "train.dtype": train_p.dtype,
                                          "train.kernels": train_p.kernels, "numerics.portable": params.numerics.portable,
                                          # data-parallel processes: they sum gradients in another order
                                          "train.world_size": distributed.current().world})
    if distributed.current().is_main:  # under torchrun, rank 0 writes
        write_stage_results("train", metrics, hooks)
