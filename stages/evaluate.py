"""``sae evaluate``: every SAE on the validation split, streamed, plus the SAE spliced into the model.

Reads ``models/sae/<hook>/``, ``data/activations/validation/<hook>/`` and (for the downstream
metrics) ``data/tokens/contexts.parquet``; writes ``metrics/evaluate.json`` as
``{hook: {"fvu@3": ..., "ce_loss_recovered@2": ..., ...}}`` and ``plots/evaluate/density_<hook>.csv``.
With ``evaluate.exclude_special_tokens`` (default) the model's tokenizer supplies the BOS/EOS/PAD
ids left out (:func:`pipeline.tokens.special_token_ids`); off, the all-token names (``fvu@2``, ...).
A transcoder (``models/sae/layers.{i}.mlp_in/``) is measured against its MLP output: the reconstruction metrics
compare ``data/activations/validation/layers.{i}.mlp_out`` with its prediction (``reconstruction_target`` names that
hook in the results), and the spliced model replaces the block's MLP by it (``pipeline.transcoder_splice``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.params import Params
from pipeline.paths import ACTIVATIONS, CONTEXTS, MODELS
from stages.common import stage_command

log = logging.getLogger("sae.evaluate")

VALIDATION = ACTIVATIONS / "validation"
PLOTS = Path("plots/evaluate")


@stage_command(help="Reconstruction, sparsity, feature density and spliced-model (CE recovered, KL) metrics of each SAE.")
def command(params: Params) -> None:
    import torch

    from pipeline.activations import open_activations
    from pipeline.devices import resolve_device
    from pipeline.environment import environment
    from pipeline.errors import UserError
    from pipeline.evaluate import evaluate_reconstruction, write_density_csv
    from pipeline.headline import write_stage_results
    from pipeline.io import nan_to_null
    from pipeline.numerics import apply_numerics
    from pipeline.pairs import saved_dictionaries
    from pipeline.progress import Progress
    from pipeline.sae import load_sae
    from pipeline.splice import splice_metrics, validation_contexts
    from pipeline.transcoder_splice import mlp_replaced_metrics

    # {hook: what its dictionary reconstructs}: itself, or a transcoder's MLP output (which has no SAE of its own)
    targets = saved_dictionaries(MODELS, params.extract.hooks)
    hooks = list(targets)
    apply_numerics(params.numerics.portable, params.numerics.threads)
    ev = params.evaluate
    device = resolve_device(ev.device, "evaluate.device")
    model, contexts, tokenizer = None, None, None
    if ev.n_splice_contexts > 0:
        from pipeline.models import load_model

        contexts = validation_contexts(CONTEXTS, ev.n_splice_contexts).to(device)
        loaded = load_model(params.model.name, params.model.revision, params.model.dtype, str(device))
        model, tokenizer = loaded.model, loaded.tokenizer
    special: frozenset[int] = frozenset()
    if ev.exclude_special_tokens:
        from pipeline.models import load_tokenizer
        from pipeline.tokens import special_token_ids

        special = special_token_ids(tokenizer if tokenizer is not None else load_tokenizer(params.model.name, params.model.revision))
        if special:
            log.info("excluding special token ids %s from the metrics", sorted(special))
        else:
            log.warning("the tokenizer has no BOS/EOS/PAD id: nothing to exclude, all-token metrics reported")

    results: dict[str, Any] = {}
    for hook in hooks:
        sae = load_sae(MODELS / hook, device=device)
        ds = open_activations(VALIDATION / hook)
        target = open_activations(VALIDATION / targets[hook]) if targets[hook] != hook else None
        if ds.d_model != sae.cfg.d_in:
            raise UserError(f"{ds.root}: d_model {ds.d_model} does not match the SAE's d_in {sae.cfg.d_in}")
        n_rows = min(ev.n_tokens, ds.n_tokens) if ev.n_tokens is not None else ds.n_tokens
        with Progress(f"evaluate {hook} reconstruction", n_rows, unit="tok") as progress:
            m, hist = evaluate_reconstruction(sae, ds, ev.n_tokens, ev.batch_size, device, special, progress, target)
        write_density_csv(PLOTS / f"density_{hook}.csv", hist)
        if model is not None and contexts is not None:
            with torch.no_grad(), Progress(f"evaluate {hook} spliced model", int(contexts.shape[0]), unit="contexts",
                                           tokens_per_unit=int(contexts.shape[1])) as progress:
                if target is not None:  # the MLP replaced by the transcoder's prediction from the MLP's input
                    m.update(mlp_replaced_metrics(model, hook, sae.predict, contexts, ev.splice_batch_size, special,
                                                  progress))
                else:
                    m.update(splice_metrics(model, hook, sae, contexts, ev.splice_batch_size, special, progress))
            m["n_splice_contexts"] = int(contexts.shape[0])
        if target is not None:
            m["reconstruction_target"] = target.hook  # type: ignore[assignment]  (fvu, mse, ... are against it)
        results[hook] = nan_to_null(m)
        log.info("%s: %s", hook, ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
    results["environment"] = environment({"evaluate.device": device, "model.dtype": params.model.dtype,
                                          "numerics.portable": params.numerics.portable})
    write_stage_results("evaluate", results, hooks)
