"""SAE files: native save/load, SAELens and sparsify import/export, clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_fit import fit
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.sae import (
    ARCHS,
    SAEConfig,
    export_saelens,
    export_sparsify,
    import_saelens,
    import_sparsify,
    load_sae,
    make_sae,
    save_sae,
)

D_IN, D_SAE = 12, 40


def trained(arch: str, recipe: str = "2024", steps: int = 3):
    """A small SAE after data init (scaling != 1) and a few Adam steps, in eval mode."""
    d_sae = 32 if arch == "dense" else D_SAE
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=d_sae, k=5, recipe=recipe, hook="layers.1.resid_post",
                    hidden_sizes=[48, 32, 48])
    sae = make_sae(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    sae.init_from_data(torch.randn(256, D_IN, generator=g) * 4 + 2)
    return fit(sae, lambda s: (torch.randn(64, D_IN, generator=g) * 4 + 2, None), steps, lr=1e-2)


def x_test() -> torch.Tensor:
    return torch.randn(32, D_IN, generator=torch.Generator().manual_seed(7)) * 4 + 2


def same_function(a, b) -> None:
    x = x_test()
    fa, fb = a.encode(x), b.encode(x)
    assert torch.allclose(fa, fb, atol=1e-5, rtol=1e-4)
    assert torch.allclose(a.decode(fa), b.decode(fa), atol=1e-4, rtol=1e-4)
    assert torch.allclose(a(x), b(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "transcoder"])  # pairs: test_transcoder.py
def test_save_load_same_function(arch: str, tmp_path: Path) -> None:
    sae = trained(arch)
    assert sae.cfg.scaling_factor != 1.0
    save_sae(sae, tmp_path / "sae", training={"lr": 1e-2, "steps": 3})
    assert sae.cfg.scaling_factor != 1.0  # saving does not touch the model being trained
    loaded = load_sae(tmp_path / "sae")
    same_function(sae, loaded)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == D_IN and cfg["hook"] == "layers.1.resid_post"
    assert cfg["scaling_factor"] == 1.0 and cfg["dtype"] == "float32"  # scaling folded into the weights
    assert cfg["training"] == {"lr": 1e-2, "steps": 3}
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]  # no temp left


def test_relu_l1_2023_save_load(tmp_path: Path) -> None:
    sae = trained("relu_l1", recipe="2023")
    same_function(sae, load_sae(save_sae(sae, tmp_path / "s")))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_sae(tmp_path / "nowhere")
    d = save_sae(trained("topk"), tmp_path / "sae")
    (d / "sae.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="sae.safetensors"):
        load_sae(d)
    (d / "sae.safetensors").unlink()
    with pytest.raises(UserError, match="sae.safetensors: SAE weights file not found"):
        load_sae(d)
    (d / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="cfg.json: not valid JSON"):
        load_sae(d)
    # weights that do not match the architecture in cfg.json
    d2 = save_sae(trained("topk"), tmp_path / "sae2")
    cfg = json.loads((d2 / "cfg.json").read_text())
    (d2 / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 41}))
    with pytest.raises(UserError, match="shape"):
        load_sae(d2)
    (d2 / "cfg.json").write_text(json.dumps(cfg | {"bogus": 1}))
    with pytest.raises(UserError, match="unknown SAE config keys"):
        load_sae(d2)


@pytest.mark.parametrize("arch,recipe", [("relu_l1", "2024"), ("relu_l1", "2023"), ("topk", "2024"),
                                         ("jumprelu", "2024"), ("gated", "2024"), ("batchtopk", "2024")])
def test_saelens_round_trip(arch: str, recipe: str, tmp_path: Path) -> None:
    sae = trained(arch, recipe)
    export_saelens(sae, tmp_path / "lens", model_name="tiny")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    expected = {"relu_l1": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                "batchtopk": "jumprelu"}[arch]
    assert cfg["architecture"] == expected and cfg["metadata"]["hook_name"] == "layers.1.resid_post"
    assert (tmp_path / "lens" / "sae_weights.safetensors").is_file()
    back = import_saelens(tmp_path / "lens")
    assert back.cfg.hook == "layers.1.resid_post"
    same_function(sae, back)


def test_saelens_unsupported(tmp_path: Path) -> None:
    for arch in ("kl", "dense"):
        with pytest.raises(UserError, match="no SAELens equivalent"):
            export_saelens(trained(arch, steps=0), tmp_path / arch)


def _write_saelens(d: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "sae_weights.safetensors"))


def test_import_saelens_matches_reference_formulas(tmp_path: Path) -> None:
    """Files written by hand in SAELens' layout; the expected latents come from its documented formulas."""
    g = torch.Generator().manual_seed(1)
    W_enc, W_dec = torch.randn(D_IN, D_SAE, generator=g), torch.randn(D_SAE, D_IN, generator=g)
    b_enc, b_dec = torch.randn(D_SAE, generator=g), torch.randn(D_IN, generator=g)
    x = x_test()
    base = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "metadata": {"hook_name": "blocks.3.hook_resid_post"}}

    # standard, apply_b_dec_to_input: f = ReLU((x - b_dec) W_enc + b_enc)
    _write_saelens(tmp_path / "std", base | {"architecture": "standard", "apply_b_dec_to_input": True},
                   {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    sae = import_saelens(tmp_path / "std")
    assert sae.cfg.arch == "relu_l1" and sae.cfg.hook == "layers.3.resid_post"  # mapped to this pipeline's name
    f_ref = ((x - b_dec) @ W_enc + b_enc).relu()
    assert torch.allclose(sae.encode(x), f_ref, atol=1e-5)
    assert torch.allclose(sae.decode(f_ref), f_ref @ W_dec + b_dec, atol=1e-4)

    # jumprelu without b_dec on the input (Gemma Scope style): f = z · 1[z > threshold]
    thr = torch.rand(D_SAE, generator=g) * 2
    _write_saelens(tmp_path / "jr", base | {"architecture": "jumprelu", "apply_b_dec_to_input": False},
                   {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr})
    z = x @ W_enc + b_enc
    assert torch.allclose(import_saelens(tmp_path / "jr").encode(x), z * (z > thr), atol=1e-5)

    # gated: 1[(x - b_dec) W_enc + b_gate > 0] · ReLU((x - b_dec)(W_enc · exp(r_mag)) + b_mag)
    b_gate, b_mag, r_mag = (torch.randn(D_SAE, generator=g) for _ in range(3))
    _write_saelens(tmp_path / "gated", base | {"architecture": "gated"},
                   {"W_enc": W_enc, "b_gate": b_gate, "b_mag": b_mag, "r_mag": r_mag, "W_dec": W_dec, "b_dec": b_dec})
    xc = x - b_dec
    ref = ((xc @ W_enc + b_gate) > 0) * (xc @ (W_enc * r_mag.exp()) + b_mag).relu()
    assert torch.allclose(import_saelens(tmp_path / "gated").encode(x), ref, atol=1e-4)

    # pre-6.0 TopK: architecture 'standard' + activation_fn_str 'topk' with k in activation_fn_kwargs
    _write_saelens(tmp_path / "tk", {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "h", "activation_fn_str": "topk",
                                     "activation_fn_kwargs": {"k": 3}},
                   {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    tk = import_saelens(tmp_path / "tk")
    assert tk.cfg.arch == "topk" and tk.cfg.k == 3 and tk.cfg.hook == "h"
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = pre.topk(3, dim=-1)
    assert torch.allclose(tk.encode(x), torch.zeros_like(pre).scatter(-1, idx, vals.relu()), atol=1e-5)

    _write_saelens(tmp_path / "bad", base | {"architecture": "standard", "normalize_activations": "expected_average_only_in"},
                   {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    with pytest.raises(UserError, match="normalize_activations"):
        import_saelens(tmp_path / "bad")


def test_sparsify_import_matches_reference(tmp_path: Path) -> None:
    """A directory in sparsify's layout: latents = TopK(ReLU(encoder(x - b_dec))), x_hat = f W_dec + b_dec."""
    g = torch.Generator().manual_seed(2)
    enc_w, enc_b = torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_SAE, generator=g)
    W_dec, b_dec = torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_IN, generator=g)
    d = tmp_path / "layers.4"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                            "num_latents": D_SAE, "k": 6, "multi_topk": False,
                                            "skip_connection": False, "transcode": False, "d_in": D_IN}))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}, str(d / "sae.safetensors"))
    sae = import_sparsify(d, hook="layers.4.resid_post")
    x = x_test()
    pre = ((x - b_dec) @ enc_w.t() + enc_b).relu()
    vals, idx = pre.topk(6, dim=-1)
    f_ref = torch.zeros_like(pre).scatter(-1, idx, vals)
    assert sae.cfg.k == 6 and sae.cfg.hook == "layers.4.resid_post"
    assert torch.allclose(sae.encode(x), f_ref, atol=1e-5)
    assert torch.allclose(sae(x), f_ref @ W_dec + b_dec, atol=1e-4)

    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps(cfg | {"skip_connection": True}))
    with pytest.raises(UserError, match="skip_connection"):
        import_sparsify(d)


def test_sparsify_round_trip(tmp_path: Path) -> None:
    sae = trained("topk")
    export_sparsify(sae, tmp_path / "sp")
    back = import_sparsify(tmp_path / "sp")
    same_function(sae, back)
    with pytest.raises(UserError, match="only 'topk'"):
        export_sparsify(trained("relu_l1", steps=0), tmp_path / "x")


def test_loading_leaves_global_rng_alone(tmp_path: Path) -> None:
    d = save_sae(trained("topk"), tmp_path / "s")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_sae(d)
    assert torch.equal(torch.rand(3), expected)
