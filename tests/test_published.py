"""Published SAEs in: each importer's encode / decode equal the source library's own.

Fixtures are written by the real packages where they install (sae-lens, eai-sparsify, and dictionary_learning's
module files loaded by path: its package needs nnsight), Gemma Scope's by hand from its documented layout.
Every tensor is random and non-zero, and d_in != d_sae, so a dropped transpose fails on shapes and a dropped
bias (or b_dec centring) on values.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.sae.published import read_folder
from pipeline.sae.published.hooknames import map_hook

D_IN, D_SAE, K = 12, 40, 5


def x_in() -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 3 + 1


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def same(ours: torch.nn.Module, enc, dec, x: torch.Tensor) -> None:
    """Our encode == ``enc(x)`` and our decode == ``dec(f)`` on the same latents."""
    f = enc(x)
    assert (f != 0).any() and (f == 0).any()
    torch.testing.assert_close(ours.encode(x), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.decode(f), dec(f), atol=1e-5, rtol=1e-5)


# ---- SAELens ---------------------------------------------------------------------------------------


def saelens_sae(arch: str, **kw):
    import sae_lens

    cls, cfg_cls = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
                    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
                    "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig)}[arch]
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw)
    cfg.metadata.hook_name, cfg.metadata.model_name = "blocks.3.hook_resid_post", "gpt2-small"
    sae = cls(cfg)
    randomise(sae)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)))
    return sae.eval()


@pytest.mark.parametrize("arch,kw", [("standard", {}), ("standard", {"apply_b_dec_to_input": False}),
                                     ("topk", {"k": K}), ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
                                     ("jumprelu", {}), ("gated", {})])
def test_saelens_equals_saelens(arch: str, kw: dict, tmp_path: Path) -> None:
    theirs = saelens_sae(arch, **kw)
    theirs.save_model(tmp_path / "s")
    f = read_folder(tmp_path / "s")
    assert f.format == "saelens" and map_hook(f.hook) == "layers.3.resid_post" and f.model == "gpt2-small"
    with torch.no_grad():
        same(f.sae, theirs.encode, theirs.decode, x_in())


def test_saelens_pre_6_config(tmp_path: Path) -> None:
    """A flat pre-6.0 config: hook_point, activation_fn_str, TopK as 'standard' + activation_fn_kwargs."""
    import sae_lens

    theirs = saelens_sae("topk", k=K)
    theirs.save_model(tmp_path / "new")
    d = tmp_path / "old"
    d.mkdir()
    (d / "sae_weights.safetensors").write_bytes((tmp_path / "new/sae_weights.safetensors").read_bytes())
    (d / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
        "hook_point": "blocks.3.hook_resid_post", "hook_point_layer": 3, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    loaded = sae_lens.SAE.load_from_disk(d)  # SAELens' own reading of the old config
    f = read_folder(d)
    assert f.sae.cfg.arch == "topk" and f.sae.cfg.k == K and f.hook == "blocks.3.hook_resid_post"
    with torch.no_grad():
        same(f.sae, loaded.encode, loaded.decode, x_in())


# ---- sparsify --------------------------------------------------------------------------------------


def test_sparsify_equals_sparsify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsify.sparse_coder
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import eager_decode

    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)  # its own CPU path (Triton needs a GPU)

    sc = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    randomise(sc)
    sc.save_to_disk(tmp_path / "run" / "layers.3")
    f = read_folder(tmp_path / "run" / "layers.3")
    assert f.format == "sparsify" and map_hook(f.hook) == "layers.3.resid_post"

    def enc(x: torch.Tensor) -> torch.Tensor:
        out = sc.encode(x)
        return torch.zeros(x.shape[0], D_SAE).scatter(-1, out.top_indices, out.top_acts)

    def dec(f: torch.Tensor) -> torch.Tensor:
        acts, idx = f.topk(K, dim=-1)
        return sc.decode(acts, idx)

    with torch.no_grad():
        same(f.sae, enc, dec, x_in())


def test_sparsify_transcoder_is_a_transcoder(tmp_path: Path) -> None:
    """Not an SAE on one hook (its equalities with sparsify: tests/test_published_transcoder.py)."""
    from sparsify import SparseCoder, SparseCoderConfig

    SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True)).save_to_disk(tmp_path / "tc")
    assert read_folder(tmp_path / "tc").sae.cfg.arch == "transcoder"


# ---- dictionary_learning ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dl() -> dict[str, type]:
    """dictionary_learning's classes from its module files (its package __init__ imports nnsight)."""
    spec = importlib.util.find_spec("dictionary_learning")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {k: v for k, v in sys.modules.items() if k.startswith("dictionary_learning")}
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    mods = {m: importlib.import_module(f"dictionary_learning.{m}") for m in
            ("dictionary", "trainers.top_k", "trainers.batch_top_k", "trainers.matryoshka_batch_top_k")}
    classes = {"AutoEncoder": mods["dictionary"].AutoEncoder, "JumpReluAutoEncoder": mods["dictionary"].JumpReluAutoEncoder,
               "GatedAutoEncoder": mods["dictionary"].GatedAutoEncoder, "AutoEncoderTopK": mods["trainers.top_k"].AutoEncoderTopK,
               "BatchTopKSAE": mods["trainers.batch_top_k"].BatchTopKSAE,
               "MatryoshkaBatchTopKSAE": mods["trainers.matryoshka_batch_top_k"].MatryoshkaBatchTopKSAE}
    yield classes
    for k in [k for k in sys.modules if k.startswith("dictionary_learning")]:
        del sys.modules[k]
    sys.modules.update(saved)


@pytest.mark.parametrize("cls", ["AutoEncoder", "JumpReluAutoEncoder", "GatedAutoEncoder", "AutoEncoderTopK",
                                 "BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning_equals_dictionary_learning(cls: str, dl: dict, tmp_path: Path) -> None:
    args = {"AutoEncoderTopK": (K,), "BatchTopKSAE": (K,), "MatryoshkaBatchTopKSAE": (K, [8, 32])}.get(cls, ())
    ae = dl[cls](D_IN, D_SAE, *args)
    randomise(ae)
    with torch.no_grad():
        if cls == "JumpReluAutoEncoder":
            ae.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)))
        if hasattr(ae, "k"):
            ae.threshold.fill_(0.4)  # the inference threshold the trainer estimates
    d = tmp_path / cls
    d.mkdir()
    torch.save(ae.state_dict(), d / "ae.pt")
    (d / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": cls, "activation_dim": D_IN, "dict_size": D_SAE, "k": K, "layer": 3, "lm_name": "EleutherAI/pythia-70m",
        "submodule_name": "resid_post_layer_3"}}))
    f = read_folder(d)
    assert f.format == "dictionary_learning" and map_hook(f.hook) == "layers.3.resid_post"
    if cls == "MatryoshkaBatchTopKSAE":  # the nested groups kept
        assert f.sae.cfg.arch == "matryoshka_batchtopk" and f.sae.cfg.matryoshka_fractions == [0.2, 0.8]
    with torch.no_grad():
        same(f.sae, ae.encode, ae.decode, x_in())


# ---- Gemma Scope -----------------------------------------------------------------------------------


def gemma_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"W_enc": g.normal(size=(D_IN, D_SAE)).astype(np.float32), "W_dec": g.normal(size=(D_SAE, D_IN)).astype(np.float32),
            "b_enc": g.normal(size=D_SAE).astype(np.float32), "b_dec": g.normal(size=D_IN).astype(np.float32),
            "threshold": g.uniform(0.1, 1.0, size=D_SAE).astype(np.float32)}


def gemma_reference(t: dict[str, np.ndarray]):
    """The documented Gemma Scope forward: no b_dec centring, JumpReLU, linear decoder."""
    T = {k: torch.from_numpy(v) for k, v in t.items()}

    def enc(x: torch.Tensor) -> torch.Tensor:
        pre = x @ T["W_enc"] + T["b_enc"]
        return pre * (pre > T["threshold"])

    return enc, lambda f: f @ T["W_dec"] + T["b_dec"]


def write_gemmascope_1(root: Path, t: dict[str, np.ndarray]) -> Path:
    d = root / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_5"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **t)
    return d


def test_gemmascope_1_equals_its_documented_forward(tmp_path: Path) -> None:
    t = gemma_tensors()
    f = read_folder(write_gemmascope_1(tmp_path, t))
    assert f.hook == "blocks.3.hook_resid_post" and f.model == "google/gemma-2-2b" and not f.sae.apply_b_dec
    same(f.sae, *gemma_reference(t), x_in())


def test_gemmascope_2_equals_its_documented_forward(tmp_path: Path) -> None:
    t = gemma_tensors(1)
    d = tmp_path / "resid_post" / "layer_3_width_16k_l0_small"
    d.mkdir(parents=True)
    save_file({k.lower(): torch.from_numpy(v) for k, v in t.items()}, d / "params.safetensors")
    (d / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
                                               "hf_hook_point_in": "model.layers.3.output"}))
    f = read_folder(d)
    assert map_hook(f.hook) == "layers.3.resid_post" and f.model == "google/gemma-3-1b-pt"
    same(f.sae, *gemma_reference(t), x_in())
    save_file({**{k.lower(): torch.from_numpy(v) for k, v in t.items()},
               "affine_skip_connection": torch.zeros(D_IN, D_IN)}, d / "params.safetensors")
    with pytest.raises(UserError, match="transcoder"):
        read_folder(d)


# ---- bad files: one line naming the file -----------------------------------------------------------


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    t = gemma_tensors()
    d = write_gemmascope_1(tmp_path, {**t, "W_dec": t["W_dec"].T.copy()})  # a transposed decoder
    with pytest.raises(UserError, match="W_dec.*shape"):
        read_folder(d)
    (d / "params.npz").unlink()
    with pytest.raises(UserError, match="no SAE files"):
        read_folder(d)
    saelens_sae("standard").save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s/cfg.json").read_text())
    (tmp_path / "s/cfg.json").write_text(json.dumps({**cfg, "architecture": "matching_pursuit"}))
    with pytest.raises(UserError, match="architecture 'matching_pursuit' is not supported"):
        read_folder(tmp_path / "s")
    (tmp_path / "s/cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "s/sae_weights.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="sae_weights.safetensors"):
        read_folder(tmp_path / "s", "saelens")


def test_hook_names_map_to_ours() -> None:
    assert map_hook("blocks.9.hook_resid_post") == "layers.9.resid_post"
    assert map_hook("blocks.0.hook_resid_pre") == "embed" and map_hook("blocks.4.hook_resid_pre") == "layers.3.resid_post"
    assert map_hook("blocks.2.hook_mlp_out") == "layers.2.mlp_out"
    assert map_hook("model.layers.9") == "layers.9.resid_post" and map_hook("gpt_neox.layers.2.mlp") == "layers.2.mlp_out"
    assert map_hook("transformer.h.5.attn") == "layers.5.attn_out" and map_hook("model.layers.7.output") == "layers.7.resid_post"
    assert map_hook("mlp_out_layer_4") == "layers.4.mlp_out"
    assert map_hook("blocks.3.attn.hook_z") is None and map_hook("blocks.3.hook_mlp_in") is None
