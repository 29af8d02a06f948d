"""``sae interpret``: what each learned feature means, with evidence, for every hook's SAE.

Reads ``models/sae/<hook>/``, ``data/activations/<interpret.split>/<hook>/`` and ``data/tokens/`` (a transcoder: its
input hook's, ``layers.{i}.mlp_in``: its latents read the MLP input; its decoder rows, which the logit lens reads,
write the MLP output);
writes ``data/interpret/<hook>/{features,examples}.parquet``, the dashboard under
``reports/features/`` (``index.html`` links one dashboard per hook) and ``metrics/interpret.json``.
LM calls are cached under ``data/interpret_cache/`` (DVC ``persist: true``, ``cache: false``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.devices import resolve_device
from pipeline.errors import UserError
from pipeline.headline import write_stage_results
from pipeline.io import atomic_write_text
from pipeline.params import Params
from pipeline.paths import ACTIVATIONS, DASHBOARD, INTERPRET, MODELS, TOKENS
from stages.common import stage_command

log = logging.getLogger("sae.interpret")

OUT = INTERPRET
CACHE = Path("data/interpret_cache")


def run_interpret(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """The stage, relative to ``root`` (tests run it in a temp directory)."""
    from pipeline.activations import open_activations
    from pipeline.autointerp import make_backend
    from pipeline.environment import environment
    from pipeline.hooks import final_norm_and_unembed
    from pipeline.interpret import build_context_table, interpret_hook
    from pipeline.interpret.dashboard import write_hooks_page
    from pipeline.interpret.run import resolve_dtype
    from pipeline.models import load_model
    from pipeline.numerics import apply_numerics
    from pipeline.pairs import saved_dictionaries
    from pipeline.sae import load_sae
    from pipeline.site import site_of

    apply_numerics(params.numerics.portable, params.numerics.threads)
    p = params.interpret
    for f in ("contexts.parquet", "documents.parquet"):
        if not (root / TOKENS / f).is_file():
            raise UserError(f"{root / TOKENS / f}: not found (run `sae prepare` first)")
    contexts = pl.read_parquet(root / TOKENS / "contexts.parquet")
    documents = pl.read_parquet(root / TOKENS / "documents.parquet")
    table = build_context_table(contexts, documents, p.split)
    device = str(resolve_device(p.device, "interpret.device"))
    encode_dtype = resolve_dtype(p.encode_dtype, device)  # 'auto' decided once, recorded below
    lm = load_model(params.model.name, params.model.revision, dtype="float32", device="cpu")
    norm, W_U = final_norm_and_unembed(lm.model)
    cfg = dataclasses.replace(p, encode_dtype=encode_dtype)
    metrics: dict[str, Any] = {}
    entries = []
    backend = None
    hooks = list(saved_dictionaries(root / MODELS, params.extract.hooks))  # a transcoder's: its mlp_in
    for hook in hooks:
        sae_dir = root / MODELS / hook
        if not (sae_dir / "cfg.json").is_file():
            raise UserError(f"{sae_dir}: no trained SAE for hook {hook} (run `sae train` first)")
        dataset = open_activations(root / ACTIVATIONS / p.split / hook)
        sae = load_sae(sae_dir, device=device)
        if sae.W_dec.shape[1] != dataset.d_model or W_U.shape[1] != dataset.d_model:
            raise UserError(f"{sae_dir}: SAE d_in {sae.W_dec.shape[1]} does not match the activations' d_model "
                            f"{dataset.d_model} or the model's width {W_U.shape[1]}")
        if backend is None and p.explainer != "stats":
            llm = params.llm
            backend = make_backend(p.explainer, root / CACHE, base_url=llm.base_url, api_key_env=llm.api_key_env,
                                   max_retries=llm.max_retries, timeout=llm.request_timeout, device=device)
        m = interpret_hook(dataset, sae, table, lm.tokenizer, norm, W_U, cfg, root / OUT / hook, root / DASHBOARD / hook,
                           backend=backend, device=device, seed=params.seed)
        metrics[hook] = m
        med = m["median_topic_auroc@1"]  # None without topic labels
        site = site_of(sae, hook)
        what = f"transcoder {site.read} -> {site.write}: " if site.paired else ""
        entries.append((hook, f"{hook}/index.html", f"{what}{m['alive_features@1']} alive features, "
                                                    f"median topic AUROC {'n/a' if med is None else f'{med:.3f}'}"))
    write_hooks_page(root / DASHBOARD, entries)
    # A declared DVC output must exist even when no LM ran ('stats' explainer).
    atomic_write_text(root / CACHE / "README.txt", "LM call cache of `sae interpret` (one JSONL per backend); "
                      "delete it to recompute explanations and scores.\n")
    env = environment({"interpret.device": device, "interpret.encode_dtype": encode_dtype,
                       "numerics.portable": params.numerics.portable})
    write_stage_results("interpret", {**metrics, "environment": env}, hooks, root)
    return metrics


@stage_command(help="Feature statistics, examples, logit lens, topic AUROC, explanations, scores and dashboard.")
def command(params: Params) -> None:
    metrics = run_interpret(params)
    for hook, m in metrics.items():
        log.info("%s: %s", hook, {k: v for k, v in m.items() if not isinstance(v, str)})
