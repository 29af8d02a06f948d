"""A transcoder's weight views and SAEBench numbers, by hand: the logit lens of its unnormalised (and zero) decoder
rows, decoder neighbours, the core reconstruction against the MLP output, and its SAEBench config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.interpret.lens import decoder_neighbours, logit_lens
from pipeline.sae import SAEConfig, make_sae
from pipeline.saebench import core, results, run

HOOK_IN, HOOK_OUT = "layers.1.mlp_in", "layers.1.mlp_out"


class _RMS(nn.Module):
    """A Llama-style RMSNorm with a non-trivial weight."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def test_lens_is_the_same_for_any_row_norm_and_empty_for_a_zero_row() -> None:
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(50, 8, generator=g)
    norm = _RMS(torch.rand(8, generator=g) + 0.5)
    W = torch.randn(4, 8, generator=g)
    scaled = torch.stack([W[0] * 1e-3, W[1] * 40.0, W[2], torch.zeros(8)])  # a transcoder's rows have any norm
    ti, tv, bi, bv = logit_lens(scaled, norm, W_U, 5)
    ref = logit_lens(W[:3], norm, W_U, 5)
    assert (ti[:3] == ref[0]).all() and (bi[:3] == ref[2]).all()
    np.testing.assert_allclose(tv[:3], ref[1], rtol=1e-5)
    # By hand: the ranking is that of W_U @ (g * d) for RMSNorm (the per-token scale drops out).
    by_hand = (W_U @ (norm.weight.detach() * W[1])).topk(5).indices.numpy()
    assert (ti[1] == by_hand).all()
    assert (ti[3] == -1).all() and (bi[3] == -1).all() and np.isnan(tv[3]).all() and np.isnan(bv[3]).all()


def test_lens_in_blocks_equals_one_block() -> None:
    # More rows than one block (the default SAE has 4,608 rows in blocks of 256): every block after the first
    # must see the same norm offset; a zero row in the first block once broke the second.
    g = torch.Generator().manual_seed(2)
    W_U = torch.randn(40, 8, generator=g)
    norm = _RMS(torch.rand(8, generator=g) + 0.5)
    W = torch.randn(7, 8, generator=g)
    W[1] = 0.0
    whole = logit_lens(W, norm, W_U, 4, block=64)
    ti, tv, bi, bv = logit_lens(W, norm, W_U, 4, block=3)
    assert (ti == whole[0]).all() and (bi == whole[2]).all()
    np.testing.assert_allclose(tv, whole[1], rtol=1e-5)  # other matmul shapes: the last bits may differ
    np.testing.assert_allclose(bv, whole[3], rtol=1e-5)
    assert (whole[0][1] == -1).all() and (whole[0][[0, 2, 3, 4, 5, 6]] >= 0).all()


def test_decoder_neighbours_skip_zero_rows() -> None:
    W = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0], [-1.0, 0.2]])
    ids, cos = decoder_neighbours(W, 3)
    assert ids[0].tolist() == [1, 3, -1] and ids[2].tolist() == [-1, -1, -1] and (cos[2] == 0).all()
    assert 2 not in ids[[0, 1, 3]]


def _transcoder(skip: bool):
    tc = make_sae(SAEConfig(arch="transcoder", d_in=8, d_sae=16, hook=HOOK_IN, k=3, skip=skip), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tc.W_dec.copy_(torch.randn(16, 8, generator=g))
        if skip:
            tc.W_skip.copy_(0.1 * torch.randn(8, 8, generator=g))
    return tc.eval()


def test_core_reconstruction_of_a_transcoder_is_against_the_target() -> None:
    tc = _transcoder(skip=True)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    tok = torch.arange(40)
    with torch.no_grad():
        st = core.reconstruction_stats([(x, tok, y)], tc.encode, tc.decode, 16, {0}, 1000, skip=tc.skip_out)
        pred = tc.predict(x[1:]).double()
    yk = y[1:].double()
    fvu = float((yk - pred).pow(2).sum() / (yk - yk.mean(0)).pow(2).sum())
    assert st["explained_variance"] == pytest.approx(1 - fvu, rel=1e-6)  # float32 prediction
    assert st["l2_norm_in"] == pytest.approx(float(yk.norm(dim=-1).mean()), rel=1e-9)
    assert st["l2_norm_out"] == pytest.approx(float(pred.norm(dim=-1).mean()), rel=1e-6)
    assert st["l0"] == pytest.approx(float((tc.encode(x[1:]) != 0).sum(-1).double().mean())) and st["n_tokens"] == 39
    with torch.no_grad():  # without the skip term the prediction misses W_skip x
        no_skip = core.reconstruction_stats([(x, tok, y)], tc.encode, tc.decode, 16, {0}, 1000)
    assert no_skip["l2_norm_out"] != pytest.approx(st["l2_norm_out"], rel=1e-4)


@pytest.mark.parametrize("skip", [False, True])
def test_saebench_files_of_a_transcoder_validate_and_name_it(skip: bool) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    sae_bench = pytest.importorskip("sae_bench")
    tc = _transcoder(skip)
    cfg = {"architecture": "transcoder", "d_in": 8, "d_sae": 16, "k": 3, "hook": HOOK_IN, "hook_out": HOOK_OUT,
           "skip": skip, "transcoder_activation": "topk", "training": {"n_tokens": 1000}}
    cfg_dict = results.sae_cfg_dict(cfg, "tiny", "float32")
    assert cfg_dict["architecture"] == ("skip_transcoder" if skip else "transcoder")
    assert (cfg_dict["hook_name"], cfg_dict["hook_name_out"], cfg_dict["hook_layer_out"]) == (HOOK_IN, HOOK_OUT, 1)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        st = core.reconstruction_stats([(x, torch.arange(32), x.flip(0))], tc.encode, tc.decode, 16, {0}, 1000,
                                       skip=tc.skip_out)
    splice = {"ce_loss_without_sae": 2.0, "ce_loss_with_sae": 2.2, "ce_loss_with_ablation": 6.0, "ce_loss_score": 0.95,
              "kl_div_with_sae": 0.1, "kl_div_with_ablation": 3.0, "kl_div_score": 0.967, "n_predictions": 120}
    payload = results.core_file(st, splice, run.feature_metrics(tc), {"model_name": "tiny"}, HOOK_IN, cfg_dict)
    schema = json.loads((Path(sae_bench.__file__).parent / "evals/core/eval_output_schema_core.json").read_text())
    jsonschema.validate(json.loads(json.dumps(payload)), schema)


def test_report_title_names_a_transcoder_and_its_output_hook() -> None:
    from pipeline.report import build_document
    from pipeline.report.inputs import ReportInputs

    inp = ReportInputs(params={"model.name": "tiny"}, hooks=[HOOK_IN],
                       sae_cfgs={HOOK_IN: {"architecture": "transcoder", "hook_out": HOOK_OUT}})
    assert build_document(inp, 2).title == f"SAE pipeline report: tiny @ {HOOK_IN} -> {HOOK_OUT} (transcoder)"
    inp.sae_cfgs[HOOK_IN] = {"architecture": "topk"}
    assert build_document(inp, 2).title == f"SAE pipeline report: tiny @ {HOOK_IN}"
