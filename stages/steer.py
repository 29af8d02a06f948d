"""``sae steer``: causal steering evaluation of one SAE's features against baselines.

Reads ``models/sae/<hook>/``, ``data/activations/<steer.stats_split>/<hook>/`` (a transcoder: its MLP input's and
MLP output's, steered at the MLP output), ``data/tokens/`` and
(when present) ``data/interpret/<hook>/features.parquet``; writes ``data/steer/generations.parquet``,
``data/steer/{likelihood,ablation}.parquet`` (the likelihood evidence per unit, ``steer.likelihood``),
``metrics/steer.json``, ``plots/steer/{concept,fluency}.csv``, ``plots/steer/frontier/<method>.csv`` and
``reports/steer/*.png``. The protocol is documented in ``pipeline/steering/``. With ``steer.judge`` on,
the LLM judge's calls are cached under ``data/steer_cache/`` (DVC ``persist: true``, ``cache: false``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import polars as pl

from pipeline.activations import open_activations
from pipeline.errors import UserError
from pipeline.headline import write_stage_results
from pipeline.hooks import parse_hook
from pipeline.io import atomic_write_json, atomic_write_parquet, atomic_write_text
from pipeline.pairs import saved_dictionaries
from pipeline.paths import ACTIVATIONS, INTERPRET, MODELS, STEER_FIGURES, TOKENS
from pipeline.site import site_of
from stages.common import Params, log, stage_command

OUT = Path("data/steer")
PLOTS = Path("plots/steer")
CACHE = Path("data/steer_cache")


@stage_command(help="Causal steering evaluation: steer SAE features (addition, clamping), ablate them, "
               "and compare with difference-in-means and random-direction baselines.")
def command(params: Params) -> None:
    import torch

    from pipeline.autointerp import make_backend
    from pipeline.environment import environment
    from pipeline.models import load_model
    from pipeline.numerics import apply_numerics
    from pipeline.sae import load_sae
    from pipeline.steering import evaluate_steering
    from pipeline.steering.baselines import read_interpret
    from pipeline.steering.judge import PROMPT_VERSION
    from pipeline.steering.plots import sweep_curves, write_plot_csvs, write_pngs

    t0 = time.perf_counter()
    apply_numerics(params.numerics.portable, params.numerics.threads)
    p = params.steer
    hook = p.hook or next(iter(saved_dictionaries(MODELS, params.extract.hooks)))  # a transcoder: its mlp_in
    sae_dir = MODELS / hook
    if not (sae_dir / "cfg.json").is_file():
        hp = parse_hook(hook)
        hint = (f"; a transcoder lives in its input hook's directory: steer.hook layers.{hp.layer}.mlp_in"
                if hp.kind == "mlp_out" and (MODELS / f"layers.{hp.layer}.mlp_in" / "cfg.json").is_file() else "")
        raise UserError(f"steer.hook: no SAE at {sae_dir} (run `sae train`, or set steer.hook to a trained hook){hint}")
    for f in ("contexts.parquet", "documents.parquet"):
        if not (TOKENS / f).is_file():
            raise UserError(f"{TOKENS / f}: not found (run `sae prepare` first)")
    torch.manual_seed(params.seed)
    lm = load_model(params.model.name, params.model.revision, params.model.dtype, params.model.device)
    device = next(lm.model.parameters()).device
    sae = load_sae(sae_dir, device=device)
    if sae.W_dec.shape[1] != lm.d_model:
        raise UserError(f"{sae_dir}: SAE d_in {sae.W_dec.shape[1]} != model d_model {lm.d_model} (wrong model?)")
    site = site_of(sae, hook)  # a transcoder reads its MLP input and is steered at its MLP output
    acts = open_activations(ACTIVATIONS / p.stats_split / site.read)
    write_acts = open_activations(ACTIVATIONS / p.stats_split / site.write) if site.paired else None
    contexts = pl.read_parquet(TOKENS / "contexts.parquet")
    documents = pl.read_parquet(TOKENS / "documents.parquet")
    interp = read_interpret(INTERPRET / hook / "features.parquet")
    # The judge talks to the endpoint interpretation uses (the shared llm section).
    llm = params.llm
    judge = make_backend(p.judge, CACHE, base_url=llm.base_url, api_key_env=llm.api_key_env,
                         max_retries=llm.max_retries, timeout=llm.request_timeout, device=str(device),
                         version=PROMPT_VERSION, key="steer.judge")
    try:
        result = evaluate_steering(lm.model, lm.tokenizer, sae, hook, contexts, documents, acts, interp, p,
                                   params.seed, bos=params.corpus.bos != "none", judge=judge,
                                   model_info={"id": lm.model_id, "dtype": params.model.dtype, "device": str(device)},
                                   write_acts=write_acts)
    finally:
        if judge is not None:
            judge.flush()  # answers so far survive a failure: a rerun resumes from them
    # A declared DVC output must exist even when no judge ran.
    atomic_write_text(CACHE / "README.txt", "LLM judge call cache of `sae steer` (one JSONL per steer.judge "
                      "backend); delete it to re-judge.\n")

    atomic_write_parquet(OUT / "generations.parquet", result.generations)
    for name, table in (("likelihood", result.likelihood), ("ablation", result.ablation)):
        if table is not None:  # the likelihood evidence per unit: what its intervals resample
            atomic_write_parquet(OUT / f"{name}.parquet", table)
        else:
            (OUT / f"{name}.parquet").unlink(missing_ok=True)
    curves = sweep_curves(result.generations)
    for d in (PLOTS, STEER_FIGURES):  # the method set may have changed: no stale series
        shutil.rmtree(d, ignore_errors=True)
    write_plot_csvs(curves, PLOTS)
    write_pngs(curves, STEER_FIGURES)
    env = environment({"model.device": device, "model.dtype": params.model.dtype,
                       "numerics.portable": params.numerics.portable})
    write_stage_results("steer", {**result.metrics, "environment": env})
    rt = {**result.runtime, "stage_s": round(time.perf_counter() - t0, 2)}
    atomic_write_json(STEER_FIGURES / "runtime.json", rt)
    log.info("steer: %d generations, %d tokens at %.0f tok/s; stage %.1fs", rt["generations"],
             rt["generated_tokens"], rt["generate_tokens_per_s"], rt["stage_s"])
