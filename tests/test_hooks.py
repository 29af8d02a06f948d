"""Uniform hook names on tiny random Llama, GPT-2, GPT-NeoX and Gemma models (CPU, offline)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.errors import UserError
from pipeline.hooks import (
    HookPoint,
    decoder_layers,
    final_norm_and_unembed,
    hook_module,
    intervene,
    parse_hook,
    run_to_hooks,
    validate_hooks,
)
from pipeline.params import ParamsError
from pipeline.testing import tiny_model

ARCHS = ["llama", "gpt2", "gpt_neox", "gemma"]
N_LAYERS = 3  # tiny_model's default depth


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    out = {}
    for arch in ARCHS:
        path = tiny_model(tmp_path_factory.mktemp(f"hooks-{arch}"), arch)
        out[arch] = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    return out


def _ids(seed: int = 0, B: int = 2, T: int = 9) -> torch.Tensor:
    return torch.randint(3, 500, (B, T), generator=torch.Generator().manual_seed(seed))  # [B, T]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits  # [B, T, vocab]


def test_parse_hook() -> None:
    assert parse_hook("layers.12.mlp_out") == HookPoint("layers.12.mlp_out", "mlp_out", 12)
    assert parse_hook("embed") == HookPoint("embed", "embed", None)
    for bad in ["layers.x.resid_post", "layer.1.resid_post", "layers.1.resid_pre", "blocks.1.hook_resid_post", ""]:
        with pytest.raises(UserError, match="allowed: layers"):
            parse_hook(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_post_and_embed_match_hidden_states(models: dict, arch: str) -> None:
    model = models[arch]
    ids = _ids()
    names = ["embed"] + [f"layers.{i}.resid_post" for i in range(N_LAYERS)]
    acts = run_to_hooks(model, ids, names)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states  # (embed, block 0, ..., block L-1 with the final norm applied)
    assert len(hs) == N_LAYERS + 1
    torch.testing.assert_close(acts["embed"], hs[0], rtol=0, atol=0)
    for i in range(N_LAYERS - 1):
        torch.testing.assert_close(acts[f"layers.{i}.resid_post"], hs[i + 1], rtol=0, atol=0)
    # HF replaces the last hidden state by final_norm(resid_post); our hook is the un-normed stream.
    norm, W_U = final_norm_and_unembed(model)
    last = acts[f"layers.{N_LAYERS - 1}.resid_post"]
    assert not torch.allclose(last, hs[-1])
    torch.testing.assert_close(norm(last), hs[-1])
    # ... and the logit lens of the last layer reproduces the model's logits.
    torch.testing.assert_close(norm(last) @ W_U.T, out.logits, rtol=1e-5, atol=1e-5)
    assert acts["embed"].shape == (2, 9, 32) and W_U.shape[1] == 32


def test_gemma_embed_is_scaled_embedding(models: dict) -> None:
    model = models["gemma"]
    ids = _ids()
    acts = run_to_hooks(model, ids, ["embed"])
    raw = torch.nn.functional.embedding(ids, model.get_input_embeddings().weight)  # [B, T, d]
    # Gemma multiplies the embedding by sqrt(d_model) before block 0; `embed` is what block 0 sees
    # (transformers 5 does the scaling inside the embedding module, older versions after it).
    torch.testing.assert_close(acts["embed"], raw * math.sqrt(32))


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_and_attn_out_match_manual_hooks(models: dict, arch: str) -> None:
    model = models[arch]
    block = decoder_layers(model)[1]
    attn = {"llama": "self_attn", "gemma": "self_attn", "gpt2": "attn", "gpt_neox": "attention"}[arch]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        getattr(block, attn).register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0])),
        block.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o)),
    ]
    try:
        _logits(model, _ids())
    finally:
        for h in handles:
            h.remove()
    acts = run_to_hooks(model, _ids(), ["layers.1.attn_out", "layers.1.mlp_out"])
    assert hook_module(model, "layers.1.attn_out") is getattr(block, attn)
    assert hook_module(model, "layers.1.mlp_out") is block.mlp
    torch.testing.assert_close(acts["layers.1.attn_out"], seen["attn"], rtol=0, atol=0)
    torch.testing.assert_close(acts["layers.1.mlp_out"], seen["mlp"], rtol=0, atol=0)
    assert not torch.allclose(acts["layers.1.attn_out"], acts["layers.1.mlp_out"])


def test_embed_module_per_arch(models: dict) -> None:
    assert hook_module(models["gpt2"], "embed") is models["gpt2"].transformer.drop
    assert hook_module(models["gpt_neox"], "embed") is models["gpt_neox"].gpt_neox.emb_dropout
    assert hook_module(models["llama"], "embed") is models["llama"].model.embed_tokens
    assert hook_module(models["llama"], "layers.2.resid_post") is models["llama"].model.layers[2]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_run_to_hooks_stops_after_deepest_hook(models: dict, arch: str) -> None:
    model = models[arch]
    layers = decoder_layers(model)
    calls = {"block2": 0, "mlp1": 0, "head": 0}
    handles = [
        layers[2].register_forward_pre_hook(lambda m, a: calls.__setitem__("block2", calls["block2"] + 1)),
        layers[1].mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__("mlp1", calls["mlp1"] + 1)),
        model.get_output_embeddings().register_forward_pre_hook(lambda m, a: calls.__setitem__("head", calls["head"] + 1)),
    ]
    try:
        run_to_hooks(model, _ids(), ["layers.0.mlp_out", "layers.1.attn_out"])
        assert calls == {"block2": 0, "mlp1": 0, "head": 0}  # stopped inside block 1, before its MLP
        run_to_hooks(model, _ids(), ["layers.1.resid_post"])
        assert calls == {"block2": 0, "mlp1": 1, "head": 0}
        _logits(model, _ids())
        assert calls == {"block2": 1, "mlp1": 2, "head": 1}
    finally:
        for h in handles:
            h.remove()


def test_multi_hook_equals_single_hook(models: dict) -> None:
    model = models["llama"]
    ids = _ids(1)
    names = ["layers.2.resid_post", "embed", "layers.0.attn_out", "layers.1.mlp_out", "layers.0.resid_post"]
    multi = run_to_hooks(model, ids, names)
    assert list(multi) == names
    for n in names:
        single = run_to_hooks(model, ids, [n])[n]
        torch.testing.assert_close(multi[n], single, rtol=0, atol=0)
        assert not multi[n].requires_grad


def test_run_to_hooks_keeps_model_dtype_and_mask(models: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model(tmp_path, "llama"), dtype=torch.bfloat16).eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of the first row
    acts = run_to_hooks(model, ids, ["layers.1.resid_post"], attention_mask=mask)
    assert acts["layers.1.resid_post"].dtype == torch.bfloat16
    unmasked = run_to_hooks(model, ids, ["layers.1.resid_post"])
    # Row 1 has no padding: identical; row 0's real tokens attend to fewer positions: different.
    torch.testing.assert_close(acts["layers.1.resid_post"][1], unmasked["layers.1.resid_post"][1])
    assert not torch.allclose(acts["layers.1.resid_post"][0, 3:], unmasked["layers.1.resid_post"][0, 3:])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hook", ["embed", "layers.0.attn_out", "layers.1.mlp_out", "layers.1.resid_post"])
def test_intervene_identity_zero_and_removal(models: dict, arch: str, hook: str) -> None:
    model = models[arch]
    ids = _ids(2)
    base = _logits(model, ids)
    with intervene(model, hook, lambda h: h):
        torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
    with intervene(model, hook, torch.zeros_like):
        assert not torch.allclose(_logits(model, ids), base, atol=1e-4)
        assert run_to_hooks(model, ids, [hook])[hook].abs().max() == 0  # recorders see the edited state
    with pytest.raises(ZeroDivisionError), intervene(model, hook, torch.zeros_like):
        raise ZeroDivisionError
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)  # removed, even after an exception


def test_intervene_nests_in_order(models: dict) -> None:
    model = models["gpt2"]
    ids = _ids(3)
    hook = "layers.0.resid_post"
    with intervene(model, hook, lambda h: 2 * h), intervene(model, hook, lambda h: h + 1):
        nested = _logits(model, ids)
    with intervene(model, hook, lambda h: 2 * h + 1):
        single = _logits(model, ids)
    torch.testing.assert_close(nested, single, rtol=0, atol=0)


def test_validate_hooks_messages() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=30, hidden_size=64, num_attention_heads=4)
    validate_hooks(["embed", "layers.0.mlp_out", "layers.29.resid_post"], cfg)
    with pytest.raises(ParamsError) as e:
        validate_hooks(["layers.3.resid_post", "layers.30.resid_post"], cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("extract.hooks: 'layers.30.resid_post'") and "layers 0..29" in msg
    with pytest.raises(ParamsError) as e:
        validate_hooks(["layers.3.residual"], cfg, key="steer.hook")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("steer.hook: 'layers.3.residual'") and "layers.{i}.resid_post" in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_in_is_what_the_mlp_reads_in_the_same_forward_as_mlp_out(models: dict, arch: str) -> None:
    """A transcoder's pair: ``mlp_in`` (the MLP's input, after its norm) and ``mlp_out`` recorded in one forward, with
    ``mlp(mlp_in) == mlp_out``; replacing ``mlp_in`` changes what the MLP computes."""
    model = models[arch]
    mlp = hook_module(model, "layers.1.mlp_in")
    assert mlp is hook_module(model, "layers.1.mlp_out")
    seen: dict[str, torch.Tensor] = {}
    handle = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    try:
        _logits(model, _ids())
    finally:
        handle.remove()
    acts = run_to_hooks(model, _ids(), ["layers.1.mlp_in", "layers.1.mlp_out"])
    torch.testing.assert_close(acts["layers.1.mlp_in"], seen["in"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(mlp(acts["layers.1.mlp_in"]), acts["layers.1.mlp_out"], rtol=0, atol=0)
    with intervene(model, "layers.1.mlp_in", lambda h: torch.zeros_like(h)):
        zeroed = run_to_hooks(model, _ids(), ["layers.1.mlp_out"])["layers.1.mlp_out"]
    with torch.no_grad():
        torch.testing.assert_close(zeroed, mlp(torch.zeros_like(acts["layers.1.mlp_in"])), rtol=0, atol=0)
