"""``sae interpret``, ``sae steer`` and ``sae bench`` on a transcoder (tiny Llama, extract [layers.1.mlp_in,
layers.1.mlp_out], a data-initialised transcoder saved in the input hook's directory standing in for `sae train`):
latents read from the MLP input, decoder rows (lens, steering) in the MLP output, the core numbers against it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from stage_workspace import invoke, sets

from pipeline.activations import open_activations
from pipeline.hooks import final_norm_and_unembed
from pipeline.saebench.hook import TRANSCODER_ABSORPTION

HOOK_IN, HOOK_OUT = "layers.1.mlp_in", "layers.1.mlp_out"
TRAIN = Path("data/activations/train")
STEER = ["steer.prompts=['The music was', 'I cooked a', 'We saw the planet', 'It is']", "steer.max_new_tokens=4",
         "steer.coefficients=[0.0, 4.0]", "steer.n_features=1", "steer.ablation_contexts=2",
         "steer.lexicon_min_count=3"]
BENCH = ["bench.documents_per_label=20", "bench.k_values=[1, 2]", "bench.bootstrap_resamples=20",
         "bench.core_tokens=256", "bench.n_splice_contexts=2", "bench.encode_dtype=float32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, labelled_corpus: Path) -> Path:
    from pipeline.sae import SAEConfig, make_sae, save_sae
    from pipeline.testing import tiny_params, write_params

    ws = tmp_path_factory.mktemp("transcoder-ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        write_params(ws / "params.yaml", tiny_params(tiny_llama, labelled_corpus, hooks=[HOOK_IN, HOOK_OUT],
                                                     sae={"arch": "transcoder", "k": 4, "skip": True}))
        invoke("prepare")
        invoke("extract")
        tc = make_sae(SAEConfig(arch="transcoder", d_in=32, d_sae=64, hook=HOOK_IN, k=4, skip=True), seed=0)
        x = next(open_activations(TRAIN / HOOK_IN).iter_batches(512)).acts
        y = next(open_activations(TRAIN / HOOK_OUT).iter_batches(512)).acts
        tc.init_from_data(x, target_sample=y)
        with torch.no_grad():  # a decoder to read (a transcoder's starts at zero); latent 63 keeps its zero row
            tc.W_dec.copy_(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)))
            tc.W_dec[63] = 0.0
            tc.W_skip.copy_(0.01 * torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
        save_sae(tc, Path("models/sae") / HOOK_IN)
        invoke("interpret", "--set", "interpret.explainer=stats")
        invoke("steer", *sets(STEER))
        invoke("bench", *sets(BENCH))
    return ws


def test_interpret_reads_the_mlp_input_and_lenses_the_decoder_rows(workspace: Path, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pipeline.interpret.lens import logit_lens
    from pipeline.sae import load_sae

    res = json.loads((workspace / "results/interpret.json").read_text())
    assert HOOK_IN in res and HOOK_OUT not in res  # one dictionary: the transcoder, keyed by its input hook
    assert not (workspace / "data/interpret" / HOOK_OUT).exists()
    feats = pl.read_parquet(workspace / "data/interpret" / HOOK_IN / "features.parquet")
    sae = load_sae(workspace / "models/sae" / HOOK_IN)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    norm, W_U = final_norm_and_unembed(model)
    top, _, _, _ = logit_lens(sae.W_dec, norm, W_U, 5)
    got = np.array(feats["top_token_ids"].to_list())
    assert (got[:63, :5] == top[:63]).all()  # the decoder rows (MLP-output directions) through the unembedding
    assert (got[63] == -1).all()  # a zero decoder row has no lens
    # Its firing statistics come from encoding the MLP input: the alive count matches a direct encode of it.
    assert res[HOOK_IN]["alive_features@1"] > 0
    index = (workspace / "reports/features/index.html").read_text()
    assert f"transcoder {HOOK_IN} -&gt; {HOOK_OUT}" in index or f"transcoder {HOOK_IN} -> {HOOK_OUT}" in index


def test_steer_writes_at_the_mlp_output(workspace: Path) -> None:
    res = json.loads((workspace / "results/steer.json").read_text())
    assert res["settings"]["hook"] == HOOK_IN and res["settings"]["write_hook"] == HOOK_OUT
    gen = pl.read_parquet(workspace / "data/steer/generations.parquet")
    assert (gen["other_features@2"] == 0.0).all()  # latents upstream of the write
    assert (gen.filter((pl.col("method") == "add") & (pl.col("coefficient") == 4.0))["kl@2"] > 0).all()
    assert "likelihood" in res


def test_bench_measures_a_transcoder_as_its_mlps_replacement(workspace: Path, tiny_llama: Path) -> None:
    from pipeline.models import load_tokenizer
    from pipeline.tokens import special_token_ids

    jsonschema = pytest.importorskip("jsonschema")
    sae_bench = pytest.importorskip("sae_bench")
    res = json.loads((workspace / "results/bench.json").read_text())
    assert HOOK_OUT not in res and res[HOOK_IN]["absorption_note"] == TRANSCODER_ABSORPTION
    assert 0.0 <= res[HOOK_IN]["sae_top_1_test_accuracy@1"] <= 1.0
    root = workspace / "eval_results"
    assert {p.parent.name for p in root.rglob("*.json")} >= {"core", "sparse_probing"}
    assert not (root / "absorption").exists() or not any((root / "absorption").iterdir())
    core = json.loads((root / "core" / f"sae-pipeline_{HOOK_IN}_eval_results.json").read_text())
    schema = json.loads((Path(sae_bench.__file__).parent / "evals/core/eval_output_schema_core.json").read_text())
    jsonschema.validate(core, schema)
    cfg = core["sae_cfg_dict"]
    assert (cfg["architecture"], cfg["hook_name"], cfg["hook_name_out"]) == ("skip_transcoder", HOOK_IN, HOOK_OUT)
    # The reconstruction numbers are the MLP output's: l2_norm_in is its mean norm over the evaluated rows.
    val = workspace / "data/activations/validation"
    special = torch.tensor(sorted(special_token_ids(load_tokenizer(str(tiny_llama)))))
    norms = []
    for hook in (HOOK_OUT, HOOK_IN):
        b = next(open_activations(val / hook).iter_batches(4096))
        norms.append(float(b.acts[~torch.isin(b.token_id, special)][:256].double().norm(dim=-1).mean()))
    got = core["eval_result_metrics"]["shrinkage"]["l2_norm_in"]
    assert got == pytest.approx(norms[0], rel=1e-6) and got != pytest.approx(norms[1], rel=1e-2)
