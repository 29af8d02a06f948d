"""A block's MLP replaced by a transcoder in the subject model's forward: the wiring, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.errors import UserError
from pipeline.hooks import hook_module
from pipeline.sae import SAEConfig, make_sae
from pipeline.testing import tiny_model
from pipeline.transcoder_splice import mlp_replaced_metrics


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    path = tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
    return AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)


def contexts() -> torch.Tensor:
    return torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(0))


def test_the_mlp_itself_recovers_everything_and_zero_nothing(model: torch.nn.Module) -> None:
    mlp = hook_module(model, "layers.1.mlp_in")
    # A perfect "transcoder" (the MLP itself, fed the recorded input) leaves the forward unchanged: recovered 1, KL 0.
    # Fed another layer's input or another forward's, it would not. (forward called directly: no hooks, no recursion.)
    exact = mlp_replaced_metrics(model, "layers.1.mlp_in", lambda x: type(mlp).forward(mlp, x), contexts(), batch_size=2)
    assert exact["ce_loss_recovered@1"] == pytest.approx(1.0, abs=1e-6) and exact["kl_div@1"] == pytest.approx(0, abs=1e-6)
    zero = mlp_replaced_metrics(model, "layers.1.mlp_in", torch.zeros_like, contexts(), batch_size=2)
    assert zero["ce_loss_recovered@1"] == pytest.approx(0.0, abs=1e-6) and zero["kl_div@1"] > 0
    # A fresh transcoder (zero decoder: predicts b_dec = 0) is the zero ablation too.
    tc = make_sae(SAEConfig(arch="transcoder", d_in=mlp.down_proj.out_features, d_sae=64, k=4), seed=0).eval()
    fresh = mlp_replaced_metrics(model, "layers.1.mlp_in", tc.predict, contexts(), batch_size=4)
    assert fresh["ce_loss_recovered@1"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="reads layers"):
        mlp_replaced_metrics(model, "layers.1.mlp_out", tc.predict, contexts(), batch_size=4)
