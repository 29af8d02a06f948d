"""``sae.source``: hub downloads (offline, against a local hub-cache layout), SAELens releases, and the checks of an
imported SAE's hook / model / d_model against the params, each a one-line error naming both sides."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.sae.io import load_sae
from pipeline.sae.published import PROVENANCE, hub, import_published
from pipeline.sae.published.saelens import resolve_release

D_IN, D_SAE = 12, 40
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GS_PATH = "layer_3/width_16k/average_l0_14"


def gemma_npz(path: Path, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, W_enc=g.normal(size=(D_IN, D_SAE)).astype(np.float32),
             W_dec=g.normal(size=(D_SAE, D_IN)).astype(np.float32), b_enc=g.normal(size=D_SAE).astype(np.float32),
             b_dec=g.normal(size=D_IN).astype(np.float32), threshold=np.full(D_SAE, 0.5, np.float32))


def needs_saelens() -> None:
    """The registry file only: finding the package, not importing it (slow)."""
    if importlib.util.find_spec("sae_lens") is None:
        pytest.skip("sae-lens not installed")


def hub_cache(root: Path, repo: str = "google/gemma-scope-2b-pt-res") -> Path:
    """A hub cache as huggingface_hub lays it out: refs/main -> snapshots/<commit>/<files>."""
    d = root / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(COMMIT)
    gemma_npz(d / "snapshots" / COMMIT / GS_PATH / "params.npz")
    return root


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache(tmp_path / "hub")


def test_hub_download_offline_from_the_cache(offline_cache: Path) -> None:
    folder = hub.download("google/gemma-scope-2b-pt-res", GS_PATH, cache_dir=offline_cache)
    assert folder == offline_cache / "models--google--gemma-scope-2b-pt-res" / "snapshots" / COMMIT / GS_PATH
    assert (folder / "params.npz").is_file()
    with pytest.raises(UserError, match="not in the hub cache.*HF_HUB_OFFLINE"):
        hub.download("google/gemma-scope-9b-pt-res", GS_PATH, cache_dir=offline_cache)


def test_hub_download_asks_only_for_the_sae_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = {}

    def fake(**kw):  # a download that lands the SAE's files in the cache, as the hub would
        seen.update(kw)
        return str(hub_cache(Path(kw["cache_dir"])) / "models--google--gemma-scope-2b-pt-res" / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = hub.download("google/gemma-scope-2b-pt-res", GS_PATH, cache_dir=tmp_path / "c")
    assert (folder / "params.npz").is_file() and not seen["local_files_only"]
    assert all(p.startswith(("layer_3/width_16k/", "layer_3/width_16k/average_l0_14/")) for p in seen["allow_patterns"])
    assert f"{GS_PATH}/params.npz" in seen["allow_patterns"]
    assert hub.parse_ref("google/gemma-scope-2b-pt-res/layer_3/x@abc") == ("google/gemma-scope-2b-pt-res", "layer_3/x", "abc")


def test_saelens_release_resolves_through_its_registry(caplog: pytest.LogCaptureFixture) -> None:
    needs_saelens()
    repo, path, fmt, model = resolve_release("gemma-scope-2b-pt-res", GS_PATH)
    assert (repo, path, fmt, model) == ("google/gemma-scope-2b-pt-res", GS_PATH, "gemmascope", "gemma-2-2b")
    assert resolve_release("gpt2-small-res-jb", "blocks.8.hook_resid_pre")[:3] == (
        "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", "saelens")
    assert "center_writing_weights" in caplog.text  # trained on TransformerLens-processed activations: said
    with pytest.raises(UserError, match="has no SAE 'nope'"):
        resolve_release("gemma-scope-2b-pt-res", "nope")
    with pytest.raises(UserError, match="not found"):
        resolve_release("no-such-release", "x")


def test_import_from_a_saelens_release_offline_writes_sae_and_provenance(offline_cache: Path, tmp_path: Path) -> None:
    needs_saelens()
    out = tmp_path / "models"
    prov = import_published(f"saelens:gemma-scope-2b-pt-res/{GS_PATH}", "auto", ["layers.3.resid_post"],
                            "google/gemma-2-2b", {"layers.3.resid_post": D_IN}, out, cache_dir=offline_cache)
    sae = load_sae(out / "layers.3.resid_post")
    assert sae.cfg.arch == "jumprelu" and sae.cfg.hook == "layers.3.resid_post" and sae.cfg.d_sae == D_SAE
    on_disk = json.loads((out / "layers.3.resid_post" / PROVENANCE).read_text())
    assert on_disk == json.loads(json.dumps(prov))
    assert prov["reference"]["commit"] == COMMIT and prov["source_hook"] == "blocks.3.hook_resid_post"
    npz = offline_cache / "models--google--gemma-scope-2b-pt-res" / "snapshots" / COMMIT / GS_PATH / "params.npz"
    import hashlib

    assert prov["files_sha256"] == {"params.npz": hashlib.sha256(npz.read_bytes()).hexdigest()}
    assert str(offline_cache) not in json.dumps(prov)  # machine-independent: no cache location in the output
    x = torch.randn(4, D_IN)
    assert sae.encode(x).shape == (4, D_SAE)


@pytest.mark.parametrize("hooks,model,d_model,match", [
    (["layers.4.resid_post"], "google/gemma-2-2b", {}, r"reads layers.3.resid_post \(blocks.3.hook_resid_post\), extract.hooks is \['layers.4.resid_post'\]"),
    (["layers.3.resid_post", "layers.4.resid_post"], "google/gemma-2-2b", {}, "set extract.hooks: \\[layers.3.resid_post\\]"),
    (["layers.3.resid_post"], "EleutherAI/pythia-70m", {}, "trained on google/gemma-2-2b, model.name is EleutherAI/pythia-70m"),
    (["layers.3.resid_post"], "google/gemma-2-2b", {"layers.3.resid_post": 64}, "d_in 12, the activations of layers.3.resid_post have d_model 64"),
])
def test_mismatch_with_params_is_one_line_naming_both(hooks, model, d_model, match, tmp_path: Path) -> None:
    folder = tmp_path / "gemma-scope-2b-pt-res" / GS_PATH
    gemma_npz(folder / "params.npz")
    with pytest.raises(UserError, match=match) as e:
        import_published(str(folder), "auto", hooks, model, d_model, tmp_path / "models")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "models").exists()


def test_unknown_source_and_format_are_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither 'train', an existing folder"):
        import_published(str(tmp_path / "missing"), "auto", ["layers.3.resid_post"], "m", {}, tmp_path)
    with pytest.raises(UserError, match="sae.source_format: 'npz' is not allowed"):
        import_published(str(tmp_path), "npz", ["layers.3.resid_post"], "m", {}, tmp_path)


def test_provenance_becomes_mlflow_tags(tmp_path: Path) -> None:
    from pipeline.tracking.record import source_tags

    folder = tmp_path / "gemma-scope-2b-pt-res" / GS_PATH
    gemma_npz(folder / "params.npz")
    prov = import_published(str(folder), "gemmascope", ["layers.3.resid_post"], "google/gemma-2-2b", {}, tmp_path / "m")
    tags = source_tags(tmp_path / "m")
    assert tags["source.layers.3.resid_post.format"] == "gemmascope"
    assert tags["source.layers.3.resid_post.sha256.params.npz"] == prov["files_sha256"]["params.npz"]
    assert tags["source.layers.3.resid_post.ref.kind"] == "local"
    assert source_tags(tmp_path / "nothing") == {}


def write_source(fmt: str, root: Path) -> tuple[str, str]:
    """An SAE on layers.3.resid_post of width D_IN in layout ``fmt`` under ``root``: (sae.source, its architecture)."""
    from pipeline.sae import SAEConfig, export_saelens, export_sparsify, make_sae

    sae = make_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=4, hook="layers.3.resid_post"), seed=0)
    if fmt == "gemmascope":
        gemma_npz(root / "gemma-scope-2b-pt-res" / GS_PATH / "params.npz")
        return f"gemma-scope-2b-pt-res/{GS_PATH}", "jumprelu"
    if fmt == "saelens":
        export_saelens(sae, root / "lens", model_name="google/gemma-2-2b")
        return "lens", "topk"
    if fmt == "sparsify":
        export_sparsify(sae, root / "run" / "layers.3")
        return "run/layers.3", "topk"
    d = root / "dl"  # dictionary_learning's BatchTopKSAE layout (nn.Linear weights are [out, in])
    d.mkdir()
    torch.save({"encoder.weight": sae.W_enc.detach().t().clone(), "encoder.bias": sae.b_enc.detach().clone(),
                "decoder.weight": sae.W_dec.detach().t().clone(), "b_dec": sae.b_dec.detach().clone(),
                "k": torch.tensor(4), "threshold": torch.tensor(0.1)}, d / "ae.pt")
    (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "layer": 3,
                                                           "lm_name": "google/gemma-2-2b",
                                                           "submodule_name": "resid_post_layer_3"}}))
    return "dl", "batchtopk"


@pytest.mark.parametrize("fmt,d_model", [("gemmascope", D_IN), ("saelens", D_IN), ("sparsify", D_IN),
                                         ("dictionary_learning", D_IN), ("gemmascope", 16)])
def test_train_stage_imports_instead_of_training(fmt: str, d_model: int, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`sae train` with sae.source set, each format: the SAE lands where training writes it; a d_model mismatch with
    the extracted activations is one line, exit 2, and writes nothing."""
    import yaml
    from click.testing import CliRunner

    from pipeline.params import Params, to_dict
    from pipeline.synthetic import write_synthetic_activations
    from stages.train import command

    monkeypatch.chdir(tmp_path)
    hook = "layers.3.resid_post"
    write_synthetic_activations(Path("data/activations/train") / hook, 256, d_model, n_features=8, k_true=2, seed=0,
                                sample_seed=0, hook=hook, dtype="float16", shard_rows=256, split="train")
    source, arch = write_source(fmt, tmp_path)
    p = to_dict(Params())
    p["model"]["name"], p["extract"]["hooks"] = "google/gemma-2-2b", [hook]
    p["sae"]["source"] = source
    Path("params.yaml").write_text(yaml.safe_dump(p))
    res = CliRunner().invoke(command, [])
    if d_model != D_IN:
        assert res.exit_code == 2 and "d_in 12, the activations of layers.3.resid_post have d_model 16" in res.output
        assert not Path("models/sae").exists() and not Path("results/train.json").exists()
        return
    assert res.exit_code == 0, res.output
    assert load_sae(Path("models/sae") / hook).cfg.arch == arch
    results = json.loads(Path("results/train.json").read_text())
    assert results[hook]["imported"] == 1 and results["source"]["format"] == fmt
    assert results["environment"]["versions.huggingface-hub"]
    assert not Path("checkpoints", hook, "state.pt").exists()


def test_report_says_the_sae_was_imported(tmp_path: Path) -> None:
    from pipeline.report.document import Document, to_markdown
    from pipeline.report.inputs import ReportInputs
    from pipeline.report.setup import setup_section

    folder = tmp_path / "gemma-scope-2b-pt-res" / GS_PATH
    gemma_npz(folder / "params.npz")
    import_published(str(folder), "auto", ["layers.3.resid_post"], "google/gemma-2-2b", {}, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "layers.3.resid_post" / "cfg.json").read_text())
    doc = Document("t")
    setup_section(doc, ReportInputs(params={}, hooks=["layers.3.resid_post"], sae_cfgs={"layers.3.resid_post": cfg}))
    md = to_markdown(doc, "figures")
    assert f"Not trained here: imported from {folder}" in md and "Training loop" not in md
    assert "files_sha256" in md and "params.npz: " in md


def test_gemma_mlp_out_sae_is_refused(tmp_path: Path) -> None:
    """Gemma Scope's mlp_out is after Gemma's post-MLP norm; this pipeline's layers.{i}.mlp_out is before it."""
    folder = tmp_path / "gemma-scope-2b-pt-mlp" / GS_PATH
    gemma_npz(folder / "params.npz")
    with pytest.raises(UserError, match="after Gemma's post-norm"):
        import_published(str(folder), "auto", ["layers.3.mlp_out"], "google/gemma-2-2b", {}, tmp_path / "m")
