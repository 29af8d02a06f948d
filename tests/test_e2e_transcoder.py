"""A skip transcoder end to end: `dvc exp run` with the (mlp_in, mlp_out) pair on a fresh copy of the project (tiny
model). Its own file (not test_e2e_archs.py) so that a parallel test run gives it its own worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e import make_repo, run
from test_e2e_pipeline import pipeline_params

pytestmark = pytest.mark.slow


def test_dvc_exp_run_takes_a_skip_transcoder_through_every_stage(tmp_path: Path, tiny_llama: Path,
                                                                 labelled_corpus: Path) -> None:
    """The README's transcoder line: extract the (mlp_in, mlp_out) pair, train one skip transcoder at mlp_in, and
    evaluate, interpret, steer and bench it as a replacement of the MLP, through the report."""
    import numpy as np
    import polars as pl
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.activations import open_activations
    from pipeline.hooks import final_norm_and_unembed
    from pipeline.interpret.lens import logit_lens
    from pipeline.models import load_tokenizer
    from pipeline.sae import load_sae
    from pipeline.saebench.hook import TRANSCODER_ABSORPTION
    from pipeline.tokens import special_token_ids

    hin, hout = "layers.1.mlp_in", "layers.1.mlp_out"
    repo = make_repo(tmp_path / "repo", pipeline_params(tiny_llama, labelled_corpus))
    run(["dvc", "exp", "run", "-S", f"extract.hooks=[{hin},{hout}]", "-S", "sae.arch=transcoder",
         "-S", "sae.skip=true", "-n", "transcoder"], repo)
    cfg = json.loads((repo / "models/sae" / hin / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["skip"], cfg["hook_out"]) == ("transcoder", True, hout)
    assert not (repo / "models/sae" / hout).exists()
    results = {s: json.loads((repo / f"results/{s}.json").read_text()) for s in ("evaluate", "interpret", "steer", "bench")}
    assert all(hout not in results[s] for s in ("evaluate", "interpret", "bench"))
    assert 0 < results["evaluate"][hin]["fvu@3"] < 1.5
    # interpret: firing statistics of the MLP input; the logit lens of the decoder rows (MLP-output directions).
    sae = load_sae(repo / "models/sae" / hin)
    norm, W_U = final_norm_and_unembed(AutoModelForCausalLM.from_pretrained(tiny_llama).eval())
    top = logit_lens(sae.W_dec, norm, W_U, 5)[0]
    feats = pl.read_parquet(repo / "data/interpret" / hin / "features.parquet")
    assert (np.array(feats["top_token_ids"].to_list())[:, :5] == top).all()
    assert f"transcoder {hin} -&gt; {hout}" in (repo / "reports/features/index.html").read_text()
    # steer: latents read at mlp_in, every method written at mlp_out.
    assert results["steer"]["settings"]["hook"] == hin and results["steer"]["settings"]["write_hook"] == hout
    assert (pl.read_parquet(repo / "data/steer/generations.parquet")["other_features@2"] == 0.0).all()
    # bench: probing on the input side, core against the MLP output, absorption not evaluated (with the reason).
    assert results["bench"][hin]["absorption_note"] == TRANSCODER_ABSORPTION
    core = json.loads((repo / "eval_results/core" / f"sae-pipeline_{hin}_eval_results.json").read_text())
    assert (core["sae_cfg_dict"]["architecture"], core["sae_cfg_dict"]["hook_name_out"]) == ("skip_transcoder", hout)
    special = torch.tensor(sorted(special_token_ids(load_tokenizer(str(tiny_llama)))))
    b = next(open_activations(repo / "data/activations/validation" / hout).iter_batches(1 << 20))
    y = b.acts[~torch.isin(b.token_id, special)][: core["eval_config"].get("core_tokens", 32768)]
    n = core["eval_result_metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"]
    assert core["eval_result_metrics"]["shrinkage"]["l2_norm_in"] == pytest.approx(
        float(y[:n].double().norm(dim=-1).mean()), rel=1e-6)
    # report: the transcoder's hook only, its architecture shown.
    summary = (repo / "reports/summary.md").read_text()
    assert f"@ {hin} -> {hout} (transcoder)" in summary.splitlines()[0] and f"models/sae/{hout}" not in summary
    assert "transcoder" in run(["dvc", "exp", "show", "--json"], repo).stdout
