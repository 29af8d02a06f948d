"""Published transcoders in: SAELens' four transcoder classes and sparsify ``transcode`` folders, written by the real
packages' own save code, import as this pipeline's ``transcoder`` with the packages' own encode / decode / forward;
native transcoders round-trip through the exports; ``sae.source`` on a transcoder checks its hook pair.

Weights are random (no training: cheap), d_in != d_sae so a dropped transpose fails on shapes, and the input is
off-centre so a dropped bias fails on values. Equalities are bitwise where the arithmetic is the same operations in
the same order (encode everywhere; decode and predict between our own files and SAELens' decode), else within fp32
rounding: sparsify's decoder sums the k chosen rows in its own order (atol 1e-5 on outputs up to ~10), and SAELens'
skip product ``x @ W_skip.T`` multiplies a transposed view, which BLAS may sum in another order (1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.sae import SAEConfig, export_saelens, export_sparsify, load_sae, make_sae, save_sae
from pipeline.sae.io import import_saelens, import_sparsify
from pipeline.sae.published import PROVENANCE, import_published, read_folder
from pipeline.sae.published.hooknames import map_pair

D_IN, D_SAE, K = 12, 40, 5
EXACT = {"rtol": 0.0, "atol": 0.0}
FP32 = {"rtol": 1e-6, "atol": 1e-6}
SUMS = {"rtol": 1e-6, "atol": 1e-5}  # sparsify's decoder: the k rows summed in its own order (outputs up to ~10)


def x_in(seed: int = 1) -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(seed)) * 3 + 1


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def saelens_transcoder(arch: str, d_in: int = D_IN, layer: int = 3, model: str = "Qwen/Qwen3-0.6B"):
    import sae_lens

    cls, cfg_cls = {"transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
                    "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
                    "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
                    "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder,
                                                 sae_lens.JumpReLUSkipTranscoderConfig)}[arch]
    cfg = cfg_cls(d_in=d_in, d_sae=D_SAE, d_out=d_in, apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"
    cfg.metadata.model_name = model
    sae = randomise(cls(cfg))
    if arch.startswith("jumprelu"):  # some thresholds below 0 (where JumpReLU is ReLU), most above
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 1.5 - 0.3)
    return sae.eval()


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoder_equals_saelens(arch: str, tmp_path: Path) -> None:
    theirs = saelens_transcoder(arch)
    theirs.save_model(tmp_path / "tc")  # SAELens' own save path
    f = read_folder(tmp_path / "tc")
    ours = f.sae
    assert f.format == "saelens" and ours.cfg.arch == "transcoder" and ours.cfg.skip == ("skip" in arch)
    assert map_pair(f.hook, f.hook_out) == ("layers.3.mlp_in", "layers.3.mlp_out")
    x = x_in()
    with torch.no_grad():
        fa = theirs.encode(x)
        assert (fa != 0).any() and (fa == 0).any()
        torch.testing.assert_close(ours.encode(x), fa, **EXACT)
        torch.testing.assert_close(ours.decode(fa), theirs.decode(fa), **EXACT)
        torch.testing.assert_close(ours.predict(x), theirs(x), **FP32)
        # and back out: the export of the import is SAELens' own transcoder again, same function
        again = __import__("sae_lens").SAE.load_from_disk(export_saelens(ours, tmp_path / "out", "Qwen/Qwen3-0.6B"))
        torch.testing.assert_close(again.encode(x), fa, **EXACT)
        torch.testing.assert_close(again(x), theirs(x), **FP32)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoder_equals_sparsify(skip: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsify.sparse_coder
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import eager_decode

    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)  # its own CPU path (Triton needs a GPU)
    sc = randomise(SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True, skip_connection=skip)))
    sc.save_to_disk(tmp_path / "run" / "layers.3.mlp")  # sparsify's own save path
    f = read_folder(tmp_path / "run" / "layers.3.mlp")
    assert f.format == "sparsify" and f.sae.cfg.transcoder_activation == "topk" and f.sae.cfg.skip == skip
    assert map_pair(f.hook, f.hook_out) == ("layers.3.mlp_in", "layers.3.mlp_out")
    x, y = x_in(), x_in(2)
    with torch.no_grad():
        enc = sc.encode(x)
        dense = torch.zeros(x.shape[0], D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(f.sae.encode(x), dense, **EXACT)
        torch.testing.assert_close(f.sae.decode(dense), sc.decode(enc.top_acts, enc.top_indices), **SUMS)
        torch.testing.assert_close(f.sae.predict(x), sc(x, y).sae_out, **SUMS)


def native(activation: str, skip: bool, seed: int = 0):
    sae = make_sae(SAEConfig(arch="transcoder", d_in=D_IN, d_sae=D_SAE, k=K, hook="layers.3.mlp_in", skip=skip,
                             transcoder_activation=activation), seed=seed)
    randomise(sae, seed)
    with torch.no_grad():
        sae.threshold.fill_(0.4)  # batchtopk's inference threshold (topk ignores it)
    return sae.eval()


@pytest.mark.parametrize("activation,skip", [("topk", False), ("topk", True), ("batchtopk", False),
                                             ("batchtopk", True)])
def test_native_export_import_round_trip(activation: str, skip: bool, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """native -> export (sparsify for topk, SAELens for batchtopk) -> import: the same transcoder, bit for bit; and
    the real package reading the export computes what ours does."""
    sae = load_sae(save_sae(native(activation, skip), tmp_path / "native"))
    x, y = x_in(), x_in(2)
    if activation == "topk":
        import sparsify
        import sparsify.sparse_coder
        from sparsify.utils import eager_decode

        monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)
        back = import_sparsify(export_sparsify(sae, tmp_path / "run" / "layers.3.mlp"))
        theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "run" / "layers.3.mlp")
        with torch.no_grad():
            enc = theirs.encode(x)
            dense = torch.zeros(x.shape[0], D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
            torch.testing.assert_close(dense, sae.encode(x), **EXACT)
            torch.testing.assert_close(theirs(x, y).sae_out, sae.predict(x), **SUMS)
    else:
        import sae_lens

        back = import_saelens(export_saelens(sae, tmp_path / "lens", model_name="tiny"))
        theirs = sae_lens.SAE.load_from_disk(tmp_path / "lens")
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), sae.encode(x), **EXACT)
            torch.testing.assert_close(theirs(x), sae.predict(x), **FP32)
    assert (back.cfg.hook, back.cfg.hook_out, back.cfg.skip) == ("layers.3.mlp_in", "layers.3.mlp_out", skip)
    with torch.no_grad():
        f = sae.encode(x)
        assert (f != 0).any() and (f == 0).any()
        torch.testing.assert_close(back.encode(x), f, **EXACT)
        torch.testing.assert_close(back.decode(f), sae.decode(f), **EXACT)
        torch.testing.assert_close(back.predict(x), sae.predict(x), **EXACT)


# ---- sae.source ------------------------------------------------------------------------------------

PAIR = ["layers.3.mlp_in", "layers.3.mlp_out"]


def test_source_transcoder_writes_sae_and_provenance(tmp_path: Path) -> None:
    saelens_transcoder("jumprelu_skip_transcoder").save_model(tmp_path / "tc")
    out = tmp_path / "models"
    prov = import_published(str(tmp_path / "tc"), "auto", PAIR[::-1], "Qwen/Qwen3-0.6B",
                            {h: D_IN for h in PAIR}, out)
    sae = load_sae(out / "layers.3.mlp_in")
    assert (sae.cfg.arch, sae.cfg.hook, sae.cfg.hook_out) == ("transcoder", *PAIR)
    assert sae.cfg.transcoder_activation == "jumprelu" and sae.cfg.skip
    on_disk = json.loads((out / "layers.3.mlp_in" / PROVENANCE).read_text())
    assert on_disk == json.loads(json.dumps(prov))
    assert (prov["hook"], prov["hook_out"]) == tuple(PAIR)
    assert (prov["source_hook"], prov["source_hook_out"]) == ("blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out")
    x = x_in()
    with torch.no_grad():  # what was written is what was read
        torch.testing.assert_close(sae.predict(x), read_folder(tmp_path / "tc").sae.predict(x), **EXACT)


@pytest.mark.parametrize("hooks,model,hook_in,match", [
    (["layers.3.mlp_in"], "Qwen/Qwen3-0.6B", None, r"set extract.hooks: \[layers.3.mlp_in, layers.3.mlp_out\]"),
    (["layers.3.resid_post"], "Qwen/Qwen3-0.6B", None, r"reading layers.3.mlp_in \(blocks.3.mlp.hook_in\) and "
     r"predicting layers.3.mlp_out \(blocks.3.hook_mlp_out\), extract.hooks is \['layers.3.resid_post'\]"),
    (["layers.4.mlp_in", "layers.4.mlp_out"], "Qwen/Qwen3-0.6B", None, "set extract.hooks: .layers.3.mlp_in"),
    (PAIR, "gpt2", None, "trained on Qwen/Qwen3-0.6B, model.name is gpt2"),
    (PAIR, "Qwen/Qwen3-0.6B", "blocks.3.ln2.hook_normalized", "before ln2's weight and bias"),
    (PAIR, "Qwen/Qwen3-0.6B", "blocks.4.mlp.hook_in", "reads layers.4.mlp_in but predicts layers.3.mlp_out"),
])
def test_source_transcoder_mismatches_are_one_line_errors(hooks: list[str], model: str, hook_in: str | None,
                                                          match: str, tmp_path: Path) -> None:
    tc = saelens_transcoder("transcoder")
    if hook_in:
        tc.cfg.metadata.hook_name = hook_in
    tc.save_model(tmp_path / "tc")
    with pytest.raises(UserError, match=match) as e:
        import_published(str(tmp_path / "tc"), "auto", hooks, model, {}, tmp_path / "models")
    assert "\n" not in str(e.value) and not (tmp_path / "models").exists()


def test_unrepresentable_transcoders_are_refused(tmp_path: Path) -> None:
    import numpy as np
    from sparsify import SparseCoder, SparseCoderConfig

    SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, skip_connection=True)).save_to_disk(tmp_path / "sk")
    with pytest.raises(UserError, match="skip_connection=true without transcode"):
        read_folder(tmp_path / "sk")
    gs = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_14"
    gs.mkdir(parents=True)
    np.savez(gs / "params.npz", W_enc=np.ones((D_IN, D_SAE), np.float32))
    with pytest.raises(UserError, match="after its post-MLP norm"):
        read_folder(gs)
    from safetensors.torch import save_file

    for w_dec, match in ((torch.ones(D_SAE), "'W_dec' has shape .40,., expected a matrix"),
                         (torch.ones(D_SAE, D_IN + 1), "from width 12 to 13")):
        bad = tmp_path / f"bad{w_dec.ndim}"
        bad.mkdir()
        save_file({"W_enc": torch.ones(D_IN, D_SAE), "b_enc": torch.ones(D_SAE), "W_dec": w_dec,
                   "b_dec": torch.ones(w_dec.shape[-1])}, bad / "sae_weights.safetensors")
        (bad / "cfg.json").write_text(json.dumps({"architecture": "transcoder", "d_in": D_IN, "d_sae": D_SAE}))
        with pytest.raises(UserError, match=match):
            read_folder(bad)
    with pytest.raises(UserError, match="'jumprelu' is an imported transcoder's form"):
        from pipeline.params.core import from_dict
        from pipeline.params.sae import SAEParams

        from_dict(SAEParams, {"arch": "transcoder", "transcoder_activation": "jumprelu"}, prefix="sae")


def test_hook_pairs_map_to_ours() -> None:
    assert map_pair("gpt_neox.layers.2.mlp", "gpt_neox.layers.2.mlp") == ("layers.2.mlp_in", "layers.2.mlp_out")
    assert map_pair("transformer.h.5.ln_2", "transformer.h.5.mlp") == ("layers.5.mlp_in", "layers.5.mlp_out")
    assert map_pair("model.layers.1.post_attention_layernorm", "model.layers.1.mlp") == ("layers.1.mlp_in",
                                                                                        "layers.1.mlp_out")
    assert map_pair("layers.3.mlp_in", None) == ("layers.3.mlp_in", None)
    assert map_pair("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out") == (None, "layers.3.mlp_out")
    assert map_pair("layers.9", "layers.9") == (None, "layers.9.resid_post")  # a whole block: not an MLP's pair


def test_sae_train_imports_a_transcoder(tmp_path: Path, tiny_llama: Path, labelled_corpus: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages: `sae train` with sae.source at a transcoder folder writes models/sae/<mlp_in>/ and its provenance,
    `sae evaluate` takes it; extract.hooks without the pair is one line naming both hooks."""
    from click.testing import CliRunner
    from stage_workspace import invoke, sets

    from pipeline.testing import tiny_params, write_params
    from stages.cli import main

    monkeypatch.chdir(tmp_path)
    pair = ["layers.1.mlp_in", "layers.1.mlp_out"]
    write_params(tmp_path / "params.yaml", tiny_params(tiny_llama, labelled_corpus, hooks=pair))
    invoke("prepare")
    invoke("extract")
    saelens_transcoder("jumprelu_skip_transcoder", d_in=32, layer=1, model=str(tiny_llama)).save_model(tmp_path / "tc")
    invoke("train", *sets([f"sae.source={tmp_path / 'tc'}"]))
    folder = Path("models/sae/layers.1.mlp_in")
    prov = json.loads((folder / PROVENANCE).read_text())
    assert (prov["hook"], prov["hook_out"], prov["format"]) == (*pair, "saelens")
    assert load_sae(folder).cfg.hook_out == "layers.1.mlp_out"
    invoke("evaluate")  # evaluated as a trained transcoder is: against its target, with the MLP replaced
    ev = json.loads(Path("results/evaluate.json").read_text())["layers.1.mlp_in"]
    assert ev["reconstruction_target"] == "layers.1.mlp_out" and "kl_div@2" in ev
    res = CliRunner().invoke(main, ["train", *sets([f"sae.source={tmp_path / 'tc'}", "extract.hooks=[layers.1.mlp_in]"])])
    assert res.exit_code == 2 and "set extract.hooks: [layers.1.mlp_in, layers.1.mlp_out]" in res.output
