"""Steering a transcoder on a tiny random Llama: every edit lands in the MLP output of its layer, latents are read
from the MLP input of the same forward; compared with hand-written forward hooks on the MLP module."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.activations import open_activations, write_activations
from pipeline.errors import UserError
from pipeline.hooks import final_norm_and_unembed
from pipeline.sae import SAEConfig, make_sae
from pipeline.site import Site, site_of
from pipeline.steering.causal import RowEdit, _logits, hidden_norm, texts_batch
from pipeline.steering.interventions import RowSteering, steer
from pipeline.steering.protocol import FeaturePlan, Prompt, SweepConfig, run_sweep
from pipeline.steering.stats import collect_stats, label_grid

HOOK_IN, HOOK_OUT = "layers.1.mlp_in", "layers.1.mlp_out"
TOKEN = 42


@pytest.fixture(scope="module")
def lm(tiny_llama: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():  # a random tiny model's logits are flat; give the planted token's unembedding weight
        model.get_output_embeddings().weight[TOKEN] *= 40.0
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def _transcoder(model):
    """A transcoder at layer 1 whose latent 0 writes the planted token's unembedding direction (x 5)."""
    tc = make_sae(SAEConfig(arch="transcoder", d_in=32, d_sae=16, hook=HOOK_IN, k=4), seed=0)
    _, W_U = final_norm_and_unembed(model)
    with torch.no_grad():
        tc.W_dec.copy_(torch.randn(16, 32, generator=torch.Generator().manual_seed(1)))
        tc.W_dec[0] = 5.0 * W_U[TOKEN] / W_U[TOKEN].norm()
        tc.W_enc.mul_(3.0)
    return tc.eval().requires_grad_(False)


def _manual_logits(model, ids, edit):
    """Next-token logits with ``edit(mlp_out, mlp_in)`` applied by plain hooks on block 1's MLP module."""
    mlp = model.model.layers[1].mlp
    seen = {}
    h1 = mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    h2 = mlp.register_forward_hook(lambda _m, _a, out: edit(out, seen["x"]))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        h1.remove()
        h2.remove()


def _steered_logits(model, ids, site, steering):
    with steer(model, site, steering), torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 33, 90, 12, 7], [8, 9, 10, 11, 12, 13]])


def test_site_of_a_transcoder_reads_mlp_in_and_writes_mlp_out(lm) -> None:
    tc = _transcoder(lm[0])
    assert site_of(tc, HOOK_IN) == Site(HOOK_IN, HOOK_OUT) and site_of(tc, HOOK_IN).paired
    sae = make_sae(SAEConfig(arch="topk", d_in=32, d_sae=16, hook="layers.1.mlp_out", k=4), seed=0)
    assert site_of(sae, "layers.1.mlp_out") == Site("layers.1.mlp_out", "layers.1.mlp_out")


def test_adding_a_latent_equals_adding_its_decoder_row_at_the_mlp_output(lm) -> None:
    model, _ = lm
    tc = _transcoder(model)
    c = torch.tensor([0.0, 3.0])
    add = c[:, None] * tc.W_dec[0][None]  # [B, d]: the latent's write, per row
    site = site_of(tc, HOOK_IN)
    got = _steered_logits(model, IDS, site, RowSteering(tc, 0, add))
    want = _manual_logits(model, IDS, lambda out, _x: out + add[:, None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    clean = _manual_logits(model, IDS, lambda out, _x: out)
    torch.testing.assert_close(got[0], clean[0], atol=0, rtol=0)  # coefficient 0 is an exact no-op
    p = torch.softmax(got[1, -1], -1)[TOKEN], torch.softmax(clean[1, -1], -1)[TOKEN]
    assert p[0] > 3 * p[1]  # the planted direction drives its token
    # Writing the same row into the MLP *input* (the stream the transcoder reads) is another intervention.
    wrong = _steered_logits(model, IDS, Site(HOOK_IN, HOOK_IN), RowSteering(tc, 0, add))
    assert (wrong[1] - want[1]).abs().max() > 1e-2


def test_clamping_encodes_the_mlp_input_and_edits_the_mlp_output(lm) -> None:
    model, _ = lm
    tc = _transcoder(model)
    clamp = torch.tensor([float("nan"), 6.0])  # row 0 untouched, row 1 clamps latent 0 to 6
    got = _steered_logits(model, IDS, site_of(tc, HOOK_IN), RowSteering(tc, 0, None, clamp))

    def edit(out, x):  # (v - f_0(x)) * W_dec[0] added to the MLP output of row 1: the error term kept
        f0 = tc.encode(x)[..., 0]  # [B, T]
        delta = (6.0 - f0)[..., None] * tc.W_dec[0]
        return out + torch.stack([torch.zeros_like(delta[0]), delta[1]])

    torch.testing.assert_close(got, _manual_logits(model, IDS, edit), atol=1e-5, rtol=0)
    # The likelihood evidence's edit (RowEdit: latent set to a value) at the same site agrees, and its ablation
    # (value 0) is the same hook with v = 0.
    mask = torch.ones_like(IDS)
    frozen = torch.zeros_like(IDS, dtype=torch.bool)
    row = RowEdit(frozen, sae=tc, latent=torch.tensor([-1, 0]), latent_value=torch.tensor([0.0, 6.0]))
    with torch.no_grad():
        lg = _logits(model, IDS, mask, site_of(tc, HOOK_IN), row)
    torch.testing.assert_close(lg, _manual_logits(model, IDS, edit), atol=1e-4, rtol=0)


def test_direction_ablation_and_hidden_norm_at_the_mlp_output(lm) -> None:
    model, _ = lm
    tc = _transcoder(model)
    site = site_of(tc, HOOK_IN)
    u = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    row = RowEdit(torch.zeros_like(IDS, dtype=torch.bool), direction=u, direction_value=torch.tensor([0.0, 0.5]))
    with torch.no_grad():
        lg = _logits(model, IDS, torch.ones_like(IDS), site, row)

    def project(out, _x):
        proj = (out * u[:, None]).sum(-1, keepdim=True)
        return out - (proj - torch.tensor([0.0, 0.5])[:, None, None]) * u[:, None]

    torch.testing.assert_close(lg, _manual_logits(model, IDS, project), atol=1e-5, rtol=0)
    texts = texts_batch([[5, 17, 33, 90], [8, 9, 10, 11]], special_ids=())  # no padding: a plain forward
    outs = []
    _manual_logits(model, texts.ids, lambda out, _x: outs.append(out) or out)
    want = float(outs[0].norm(dim=-1)[~texts.frozen].mean())
    assert hidden_norm(model, site, texts) == pytest.approx(want, rel=1e-6)
    assert hidden_norm(model, HOOK_IN, texts) != pytest.approx(want, rel=1e-3)


def test_sweep_steers_at_the_mlp_output_and_reencodes_the_mlp_input(lm) -> None:
    model, tok = lm
    tc = _transcoder(model)
    site = site_of(tc, HOOK_IN)
    prompts = [Prompt(0, "a", "test", [5, 17, 33]), Prompt(1, "b", "validation", [8, 9])]
    plan = FeaturePlan(0, None, 2.0, {"add": tc.W_dec[0].clone(), "random": torch.ones(32)})
    cfg = SweepConfig(site, ["add", "clamp", "random"], [0.0, 10.0], max_new_tokens=4, batch_size=14)
    rows, _ = run_sweep(model, tok, tc, plan, prompts, cfg, None)
    df = pl.DataFrame(rows)
    assert len(df) == 2 * (1 + 3 * 2)
    # A transcoder's latents sit upstream of its write: the others cannot change on the prompt.
    assert df["other_features@2"].to_list() == [0.0] * len(df)
    # Coefficient 0 leaves the prompt's next-token distributions alone; the MLP-output edits move them.
    kl = {(m, c): v for m, c, v in df.group_by("method", "coefficient").agg(pl.col("kl@2").min()).iter_rows()}
    assert kl[("add", 0.0)] == kl[("random", 0.0)] == kl[("none", 0.0)] == 0.0
    assert min(kl[("add", 10.0)], kl[("random", 10.0)], kl[("clamp", 10.0)]) > 0.0
    assert df["concept_act@2"].is_finite().all()  # the continuations re-encoded at the MLP input


def test_stats_take_hidden_means_from_the_write_dataset_in_lockstep(tmp_path: Path) -> None:
    contexts = pl.DataFrame({"context_id": [10, 11], "split": ["validation"] * 2,
                             "token_ids": [[1, 2, 3, 4], [5, 6, 7, 8]], "document_ids": [[1, 1, 1, 1], [2, 2, 2, 2]]})
    documents = pl.DataFrame({"document_id": [1, 2], "label": ["a", "b"]})
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    meta = {"context_id": np.repeat([10, 11], 4), "token_id": np.arange(1, 9), "dtype": "float32"}
    write_activations(tmp_path / "in", x, position=np.tile(np.arange(4), 2), hook=HOOK_IN, **meta)
    write_activations(tmp_path / "out", y, position=np.tile(np.arange(4), 2), hook=HOOK_OUT, **meta)
    write_activations(tmp_path / "shifted", y, position=np.tile([1, 2, 3, 0], 2), hook=HOOK_OUT, **meta)
    topics, rows, grid = label_grid(contexts, documents)
    tc = make_sae(SAEConfig(arch="transcoder", d_in=3, d_sae=4, hook=HOOK_IN, k=2), seed=0)
    st = collect_stats(tc, open_activations(tmp_path / "in"), topics, rows, grid, 100, batch_size=3,
                       write_ds=open_activations(tmp_path / "out"))
    np.testing.assert_allclose(st.resid_topic_mean, [y[:4].mean(0), y[4:].mean(0)], rtol=1e-6)
    np.testing.assert_allclose(st.resid_mean, y.mean(0), rtol=1e-6, atol=1e-7)
    own = collect_stats(tc, open_activations(tmp_path / "in"), topics, rows, grid, 100, batch_size=3)
    np.testing.assert_allclose(st.max_act, own.max_act)  # latents from the input either way
    with pytest.raises(UserError, match="not aligned"):
        collect_stats(tc, open_activations(tmp_path / "in"), topics, rows, grid, 100, batch_size=3,
                      write_ds=open_activations(tmp_path / "shifted"))


def test_a_copy_of_the_model_is_left_without_hooks(lm) -> None:
    """The site's two hooks are removed on exit (an exception included)."""
    model = copy.deepcopy(lm[0])
    tc = _transcoder(model)
    with pytest.raises(RuntimeError), steer(model, site_of(tc, HOOK_IN), RowSteering(tc, 0, torch.ones(2, 32))):
        raise RuntimeError
    mlp = model.model.layers[1].mlp
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks


def test_stages_find_the_transcoder_under_its_input_hook(tmp_path: Path, tiny_llama: Path, labelled_corpus: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """steer.hook set to the transcoder's output hook is one line naming its input hook; the report lists the
    transcoder's hook only (an SAE experiment every hook)."""
    from click.testing import CliRunner

    from pipeline.testing import tiny_params, write_params
    from stages.cli import main
    from stages.report import _dictionary_hooks

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_params(tiny_llama, labelled_corpus, hooks=[HOOK_IN, HOOK_OUT],
                                                       sae={"arch": "transcoder"}))
    (tmp_path / "models/sae" / HOOK_IN).mkdir(parents=True)
    (tmp_path / "models/sae" / HOOK_IN / "cfg.json").write_text('{"architecture": "transcoder"}')
    res = CliRunner().invoke(main, ["steer", "--set", f"steer.hook={HOOK_OUT}"])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert f"a transcoder lives in its input hook's directory: steer.hook {HOOK_IN}" in res.output
    assert _dictionary_hooks([HOOK_IN, HOOK_OUT]) == [HOOK_IN]
    (tmp_path / "models/sae" / HOOK_IN / "cfg.json").write_text('{"architecture": "topk"}')
    assert _dictionary_hooks([HOOK_IN, HOOK_OUT]) == [HOOK_IN, HOOK_OUT]
