"""``sae bench``: SAEBench-comparable evaluation of every SAE: sparse probing on the corpus's labels,
first-letter feature absorption, and SAEBench result files.

Reads ``models/sae/<hook>/``, ``data/activations/{train,validation}/<hook>/`` (a transcoder: its MLP input's and,
for the core numbers, its MLP output's), ``data/tokens/`` and (for the
autointerp result file) ``data/interpret/<hook>/features.parquet``; loads the model for the absorption
prompts and the core file's CE/KL. Writes ``results/bench.json`` (``{hook: {"sae_top_1_test_accuracy@1": ...}}``),
its headline ``metrics/bench.json`` (:mod:`pipeline.headline`) and
``eval_results/<eval>/sae-pipeline_<hook>_eval_results.json`` for core, sparse_probing, absorption (when
enough letters are present) and autointerp (when interpret ran).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.params import Params
from pipeline.paths import ACTIVATIONS, CONTEXTS, INTERPRET, MODELS, TOKENS
from stages.common import stage_command

log = logging.getLogger("sae.bench")

EVAL_RESULTS = Path("eval_results")


@stage_command(help="SAEBench-comparable evaluation: k-sparse probing on the corpus's labels, feature absorption, SAEBench result files.")
def command(params: Params) -> None:
    import dataclasses

    import polars as pl

    from pipeline.activations import open_activations
    from pipeline.devices import resolve_device
    from pipeline.environment import cpu_has_fast_bf16, environment
    from pipeline.errors import UserError
    from pipeline.headline import write_stage_results
    from pipeline.io import nan_to_null
    from pipeline.models import load_model
    from pipeline.numerics import apply_numerics
    from pipeline.pairs import saved_dictionaries
    from pipeline.sae import load_sae
    from pipeline.saebench.hook import HookInputs, RunInfo, bench_hook
    from pipeline.saebench.run import BenchConfig
    from pipeline.site import site_of
    from pipeline.splice import validation_contexts
    from pipeline.tokens import special_token_ids

    apply_numerics(params.numerics.portable, params.numerics.threads)
    bp = params.bench
    device = resolve_device(bp.device, "bench.device")
    dtype = bp.encode_dtype if bp.encode_dtype != "auto" else (
        "bfloat16" if device.type == "cuda" or cpu_has_fast_bf16() else "float32")
    cfg = BenchConfig(**{f.name: getattr(bp, f.name) for f in dataclasses.fields(BenchConfig)
                         if f.name not in ("encode_dtype", "k_values")}, encode_dtype=dtype, k_values=tuple(bp.k_values))
    documents_path = TOKENS / "documents.parquet"
    for path in (CONTEXTS, documents_path):
        if not path.is_file():
            raise UserError(f"{path}: not found (run `sae prepare` first)")
    contexts = pl.read_parquet(CONTEXTS, columns=["context_id", "document_ids"])
    documents = pl.read_parquet(documents_path, columns=["document_id", "label"])
    if documents["label"].drop_nulls().n_unique() < 2:
        raise UserError(f"{documents_path}: sparse probing needs a corpus with at least two labels (corpus.label_column)")
    loaded = load_model(params.model.name, params.model.revision, params.model.dtype, str(device))
    info = RunInfo(loaded.model_id, params.model.dtype, str(params.corpus.source), params.corpus.context_length,
                   params.seed)
    special = special_token_ids(loaded.tokenizer)
    splice_contexts = validation_contexts(CONTEXTS, cfg.n_splice_contexts).to(device)
    out: dict[str, Any] = {}
    hooks = list(saved_dictionaries(MODELS, params.extract.hooks))  # a transcoder's: its mlp_in
    for hook in hooks:
        sae = load_sae(MODELS / hook, device=device).eval()
        site = site_of(sae, hook)
        sets = [open_activations(ACTIVATIONS / split / hook) for split in ("train", "validation")]
        targets = [open_activations(ACTIVATIONS / split / site.write) for split in ("train", "validation")] \
            if site.paired else None
        for ds in sets + (targets or []):
            if ds.d_model != sae.cfg.d_in:
                raise UserError(f"{ds.root}: d_model {ds.d_model} does not match the SAE's d_in {sae.cfg.d_in}")
        inp = HookInputs(MODELS / hook, sets, contexts, documents, INTERPRET / hook / "features.parquet", targets)
        out[hook] = nan_to_null(bench_hook(hook, sae, inp, loaded.model, loaded.tokenizer, special, splice_contexts,
                                           cfg, info, device, EVAL_RESULTS))
    out["environment"] = environment({"bench.device": device, "bench.encode_dtype": dtype,
                                      "model.dtype": params.model.dtype, "numerics.portable": params.numerics.portable})
    write_stage_results("bench", out, hooks)
