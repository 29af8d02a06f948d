"""Evaluation: streamed reconstruction metrics against hand-computed values, spliced-model metrics,
and the ``sae evaluate`` stage end to end on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import metrics
from pipeline.activations import open_activations, write_activations
from pipeline.evaluate import density_histogram, reconstruction_metrics
from pipeline.models import load_model
from pipeline.params import Params, to_dict
from pipeline.sae import SAE, SAEConfig, make_sae, save_sae
from pipeline.splice import splice_metrics

HOOK = "layers.1.resid_post"


def _topk_sae(W_enc: torch.Tensor, W_dec: torch.Tensor, k: int) -> SAE:
    """A TopK SAE with given weights, zero biases, no input scaling."""
    d_in, d_sae = W_enc.shape
    sae = make_sae(SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k, hook=HOOK), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def _exact_sae(d: int) -> SAE:
    """Latents relu(x) and relu(-x): at most d of the 2d are nonzero, so TopK with k=d reconstructs x exactly."""
    eye = torch.eye(d)
    return _topk_sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), k=d)


def test_reconstruction_metrics_match_hand_computed(tmp_path: Path) -> None:
    # Identity dictionary with k=1: each token keeps only its largest coordinate.
    x = np.array([[3.0, 1.0], [0.0, 2.0], [2.0, 0.0], [1.0, 0.0]], np.float32)
    write_activations(tmp_path / "acts", x, hook=HOOK, dtype="float32")
    sae = _topk_sae(torch.eye(2), torch.eye(2), k=1)
    m = reconstruction_metrics(sae, open_activations(tmp_path / "acts"), batch_size=3)  # 2 batches: 3 + 1
    # x_hat = [[3,0],[0,2],[2,0],[1,0]]: the only error is 1 on the first token.
    # sum ||x||^2 = 19; mean = [1.5, 0.75]; total variance = 19 - 4 * (2.25 + 0.5625) = 7.75.
    assert m[metrics.MSE] == pytest.approx(1 / 8)
    assert m[metrics.UNCENTERED_NMSE] == pytest.approx(1 / 19)
    assert m[metrics.FVU] == pytest.approx(1 / 7.75)
    assert m[metrics.L0] == pytest.approx(1.0)
    assert m[metrics.L1] == pytest.approx((3 + 2 + 2 + 1) / 4)
    assert m[metrics.SHRINKAGE] == pytest.approx((3 / math.sqrt(10) + 3) / 4)
    assert m[metrics.DEAD_FRACTION] == 0.0  # latent 0 fires on 3 tokens, latent 1 on 1
    assert m[metrics.DENSE_FRACTION] == 1.0  # both fire on more than 10% of the 4 tokens
    assert m["n_tokens"] == 4
    # n_tokens limits the stream: the first token alone has FVU undefined (zero variance) -> NaN.
    assert math.isnan(reconstruction_metrics(sae, open_activations(tmp_path / "acts"), n_tokens=1)[metrics.FVU])
    assert reconstruction_metrics(sae, open_activations(tmp_path / "acts"), n_tokens=2)["n_tokens"] == 2


def test_special_token_rows_are_excluded_from_reconstruction_metrics(tmp_path: Path) -> None:
    # The same four text rows as above (a third, zero dimension added) plus a BOS row (token id 0)
    # that the k=1 identity dictionary reconstructs badly: x = [40, 0, 50] -> x_hat = [0, 0, 50].
    x = np.array([[40.0, 0.0, 50.0], [3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    tok = np.array([0, 7, 8, 9, 7])
    write_activations(tmp_path / "acts", x, token_id=tok, hook=HOOK, dtype="float32")
    sae = _topk_sae(torch.eye(3), torch.eye(3), k=1)
    ds = open_activations(tmp_path / "acts")
    m = reconstruction_metrics(sae, ds, batch_size=2, special_ids={0, 1})  # batches [BOS, text], [text, text], [text]
    # Over the 4 text rows only: the hand values of the test above, under the bumped names.
    assert m["mse@2"] == pytest.approx(1 / 12)  # one unit of error over 4 tokens x 3 dimensions
    assert m["uncentered_nmse@2"] == pytest.approx(1 / 19)
    assert m["fvu@3"] == pytest.approx(1 / 7.75)
    assert m["l0@2"] == 1.0 and m["l1@2"] == pytest.approx(2.0)
    assert m["shrinkage@2"] == pytest.approx((3 / math.sqrt(10) + 3) / 4)
    assert m["dead_fraction@2"] == pytest.approx(1 / 3)  # latent 2 fires on the BOS row only
    assert m["dense_fraction@2"] == pytest.approx(2 / 3)
    assert m["n_tokens"] == 4 and m["n_special_tokens"] == 1
    # The all-token reference: error 1 + 1600 = 1601; mean [9.2, 0.6, 10]; total variance
    # sum ||x||^2 - N ||mean||^2 = 4119 - 5 * 185 = 3194.
    assert m[metrics.FVU] == pytest.approx(1601 / 3194) and m[metrics.L0] == 1.0
    assert set(m) == {*metrics.EXCLUDING_SPECIAL.values(), metrics.FVU, metrics.L0, "n_tokens", "n_special_tokens"} - {
        "ce_loss_recovered@2", "kl_div@2", "delta_lm_loss@2", "ce_clean@2", "ce_sae@2", "ce_zero_ablation@2"}
    # No special ids: the all-token names and values, BOS included.
    every = reconstruction_metrics(sae, ds, batch_size=2)
    assert every[metrics.FVU] == pytest.approx(1601 / 3194) and every[metrics.DEAD_FRACTION] == 0.0
    assert every["n_tokens"] == 5 and "fvu@3" not in every and "n_special_tokens" not in every
    # n_tokens limits rows read, special ones included: the first two rows hold one text token.
    assert reconstruction_metrics(sae, ds, n_tokens=2, special_ids={0})["n_tokens"] == 1


def test_all_special_rows_is_a_user_error(tmp_path: Path) -> None:
    from pipeline.errors import UserError

    # Bring-your-own activations written without token ids get token id 0, which is BOS here.
    write_activations(tmp_path / "acts", np.ones((4, 2), np.float32), hook=HOOK, dtype="float32")
    with pytest.raises(UserError, match="exclude_special_tokens: false"):
        reconstruction_metrics(_topk_sae(torch.eye(2), torch.eye(2), k=1), open_activations(tmp_path / "acts"),
                               special_ids={0})


def test_density_histogram_bins_log_frequency() -> None:
    rows = density_histogram(torch.tensor([0.75, 0.25, 0.0, 1e-9]))
    by_edge = {r["log10_frequency"]: r["n_latents"] for r in rows}
    assert by_edge[-0.25] == 1  # log10(0.75) = -0.12
    assert by_edge[-0.75] == 1  # log10(0.25) = -0.60
    assert by_edge[-7.0] == 1  # below 1e-7: first bin
    assert sum(by_edge.values()) == 3  # the dead latent has no log frequency


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> torch.nn.Module:
    return load_model(str(tiny_llama)).model


def _contexts(n: int = 6, T: int = 12) -> torch.Tensor:
    return torch.randint(3, 500, (n, T), generator=torch.Generator().manual_seed(0))  # [n, T]


def test_splice_identity_recovers_all_loss(tiny: torch.nn.Module) -> None:
    ids = _contexts()
    m = splice_metrics(tiny, HOOK, lambda h: h, ids, batch_size=4)
    assert m[metrics.CE_LOSS_RECOVERED] == 1.0
    assert m[metrics.KL_DIV] == 0.0 and m[metrics.DELTA_LM_LOSS] == 0.0
    assert m[metrics.CE_ZERO_ABLATION] != m[metrics.CE_CLEAN]
    # A real SAE that reconstructs exactly (up to float error): recovered ~ 1, KL ~ 0.
    m = splice_metrics(tiny, HOOK, _exact_sae(32), ids, batch_size=4)
    assert m[metrics.CE_LOSS_RECOVERED] == pytest.approx(1.0, abs=1e-4)
    assert abs(m[metrics.KL_DIV]) < 1e-6
    # Replacing the hook by zeros *is* zero ablation: nothing recovered.
    m = splice_metrics(tiny, HOOK, torch.zeros_like, ids, batch_size=4)
    assert m[metrics.CE_LOSS_RECOVERED] == 0.0


def test_splice_metrics_match_direct_computation(tiny: torch.nn.Module) -> None:
    from pipeline.hooks import intervene

    ids = _contexts()
    noisy = lambda h: h + 0.5 * torch.ones_like(h)  # noqa: E731 - a deterministic corruption
    m = splice_metrics(tiny, HOOK, noisy, ids, batch_size=4)
    with torch.no_grad():
        clean = tiny(input_ids=ids).logits.double()
        with intervene(tiny, HOOK, noisy):
            bad = tiny(input_ids=ids).logits.double()
        with intervene(tiny, HOOK, torch.zeros_like):
            zero = tiny(input_ids=ids).logits.double()
    tgt = ids[:, 1:].reshape(-1)

    def ce(lg: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), tgt).item()

    c, s, z = ce(clean), ce(bad), ce(zero)
    assert m[metrics.CE_CLEAN] == pytest.approx(c, rel=1e-5)
    assert m[metrics.CE_LOSS_RECOVERED] == pytest.approx((z - s) / (z - c), rel=1e-4)
    assert m[metrics.DELTA_LM_LOSS] == pytest.approx(s - c, rel=1e-4)
    p, q = clean[:, :-1].log_softmax(-1), bad[:, :-1].log_softmax(-1)
    assert m[metrics.KL_DIV] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-4)
    assert m[metrics.KL_DIV] > 0


def _with_specials(ids: torch.Tensor) -> torch.Tensor:
    """BOS (id 0) at position 0 of every context and an EOS (id 1) at position 5 of the first."""
    ids = ids.clone()
    ids[:, 0] = 0
    ids[0, 5] = 1
    return ids


def test_splice_leaves_special_positions_untouched(tiny: torch.nn.Module) -> None:
    ids = _with_specials(_contexts())
    special = ((ids == 0) | (ids == 1))[..., None]  # [6, 12, 1]
    # A reconstruction exact everywhere except at the special positions (one batch holds all 6 contexts).
    m = splice_metrics(tiny, HOOK, lambda h: torch.where(special, h + 100.0, h), ids, batch_size=6, special_ids={0, 1})
    # The corruption lands only where the original activation is kept: the spliced model is the clean one.
    assert m["ce_loss_recovered@2"] == 1.0 and m["kl_div@2"] == 0.0 and m["delta_lm_loss@2"] == 0.0
    # The all-token reference splices BOS/EOS too, and every later position attends to them.
    assert m[metrics.KL_DIV] > 1e-3 and m[metrics.CE_LOSS_RECOVERED] < 1.0
    assert set(m) == {"ce_loss_recovered@2", "kl_div@2", "delta_lm_loss@2", "ce_clean@2", "ce_sae@2",
                      "ce_zero_ablation@2", metrics.CE_LOSS_RECOVERED, metrics.KL_DIV}


def test_splice_special_positions_match_direct_computation(tiny: torch.nn.Module) -> None:
    from pipeline.hooks import intervene

    ids = _with_specials(_contexts())
    special = (ids == 0) | (ids == 1)  # [6, 12]
    noisy = lambda h: h + 0.5 * torch.ones_like(h)  # noqa: E731
    m = splice_metrics(tiny, HOOK, noisy, ids, batch_size=4, special_ids={0, 1})
    with torch.no_grad():
        clean = tiny(input_ids=ids).logits.double()
        with intervene(tiny, HOOK, lambda h: torch.where(special[..., None], h, noisy(h))):
            bad = tiny(input_ids=ids).logits.double()
        with intervene(tiny, HOOK, lambda h: torch.where(special[..., None], h, torch.zeros_like(h))):
            zero = tiny(input_ids=ids).logits.double()
    keep = ~special[:, :-1]  # predictions made at positions 0..T-2 that hold no special token
    assert int(keep.sum()) == 6 * 11 - 6 - 1

    def ce(lg: torch.Tensor) -> float:
        per = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view(6, 11)
        return per[keep].mean().item()

    c, s, z = ce(clean), ce(bad), ce(zero)
    assert m["ce_clean@2"] == pytest.approx(c, rel=1e-5) and m["ce_zero_ablation@2"] == pytest.approx(z, rel=1e-5)
    assert m["ce_sae@2"] == pytest.approx(s, rel=1e-5) and m["delta_lm_loss@2"] == pytest.approx(s - c, rel=1e-4)
    # (the tiny random model barely needs the hook, so z - c is small and the ratio ill-conditioned)
    assert m["ce_loss_recovered@2"] == metrics.ce_loss_recovered(m["ce_clean@2"], m["ce_sae@2"], m["ce_zero_ablation@2"])
    p, q = clean[:, :-1].log_softmax(-1), bad[:, :-1].log_softmax(-1)
    assert m["kl_div@2"] == pytest.approx((p.exp() * (p - q)).sum(-1)[keep].mean().item(), rel=1e-4)
    # The reference values are those of the all-token splice, bit for bit.
    ref = splice_metrics(tiny, HOOK, noisy, ids, batch_size=4)
    assert m[metrics.CE_LOSS_RECOVERED] == ref[metrics.CE_LOSS_RECOVERED] and m[metrics.KL_DIV] == ref[metrics.KL_DIV]


def test_evaluate_stage_writes_metrics_and_density(tiny_llama: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.evaluate import command

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    tok = np.where(np.arange(300) % 10 == 0, 0, 7)  # every 10th row is BOS (the tiny tokenizer's id 0)
    write_activations(Path("data/activations/validation") / HOOK, rng.standard_normal((300, 32)).astype(np.float32),
                      token_id=tok, hook=HOOK, dtype="float32")
    save_sae(_exact_sae(32), Path("models/sae") / HOOK)
    ids = _with_specials(_contexts(8, 10)).numpy()
    table = pa.table({"context_id": pa.array(range(8), pa.int32()), "split": ["train"] * 3 + ["validation"] * 5,
                      "token_ids": pa.array(ids.tolist(), pa.list_(pa.int32())),
                      "document_ids": pa.array(np.zeros_like(ids).tolist(), pa.list_(pa.int32()))})
    Path("data/tokens").mkdir(parents=True)
    pq.write_table(table, "data/tokens/contexts.parquet")
    p = to_dict(Params())
    p["model"].update(name=str(tiny_llama), dtype="float32", device="cpu")
    p["extract"]["hooks"] = [HOOK]
    p["evaluate"].update(n_splice_contexts=4, splice_batch_size=3, device="cpu", batch_size=128)
    Path("params.yaml").write_text(yaml.safe_dump(p))

    res = CliRunner().invoke(command, [])
    assert res.exit_code == 0, res.output
    out = json.loads(Path("results/evaluate.json").read_text())[HOOK]
    # Default exclude_special_tokens: the tokenizer's BOS/EOS/PAD rows and positions are left out.
    assert out["fvu@3"] == pytest.approx(0.0, abs=1e-10) and out[metrics.FVU] == pytest.approx(0.0, abs=1e-10)
    assert out["l0@2"] == 32.0 and out[metrics.L0] == 32.0  # one of relu(x_i), relu(-x_i) per coordinate
    assert out["ce_loss_recovered@2"] == pytest.approx(1.0, abs=1e-4)
    assert out[metrics.CE_LOSS_RECOVERED] == pytest.approx(1.0, abs=1e-4) and metrics.KL_DIV in out
    assert out["n_tokens"] == 270 and out["n_special_tokens"] == 30 and out["n_splice_contexts"] == 4
    lines = Path(f"plots/evaluate/density_{HOOK}.csv").read_text().splitlines()
    assert lines[0] == "log10_frequency,n_latents" and len(lines) == 29
    assert sum(int(r.split(",")[1]) for r in lines[1:]) == 64  # every latent fires on ~half the tokens

    # exclude_special_tokens: false -> the all-token names only, every row counted.
    p["evaluate"]["exclude_special_tokens"] = False
    Path("params.yaml").write_text(yaml.safe_dump(p))
    res = CliRunner().invoke(command, [])
    assert res.exit_code == 0, res.output
    out = json.loads(Path("results/evaluate.json").read_text())[HOOK]
    assert set(out) == {metrics.MSE, metrics.UNCENTERED_NMSE, metrics.FVU, metrics.SHRINKAGE, metrics.L0, metrics.L1,
                        metrics.DEAD_FRACTION, metrics.DENSE_FRACTION, "n_tokens", metrics.CE_LOSS_RECOVERED,
                        metrics.DELTA_LM_LOSS, metrics.KL_DIV, metrics.CE_CLEAN, metrics.CE_SAE,
                        metrics.CE_ZERO_ABLATION, "n_splice_contexts"}
    assert out["n_tokens"] == 300


def _exp(rev: str, name: str | None, k: int, experiments: list | None = None) -> dict:
    """One entry shaped like DVC 3.67's `dvc exp show --json` (captured from a real run, trimmed)."""
    m = {HOOK: {"l0@1": float(k), "fvu@2": 1.0 / k, "ce_loss_recovered@1": 1.0 - 1.0 / k}}
    data = {"rev": rev, "params": {"params.yaml": {"data": {"sae": {"k": k}}}},
            "metrics": {"metrics/evaluate.json": {"data": m}}, "deps": {}, "outs": {}, "meta": {}}
    return {"rev": rev, "name": name, "data": data, "error": None, "experiments": experiments}


def test_frontier_reads_exp_show_and_draws_png(tmp_path: Path) -> None:
    from pipeline.frontier import frontier_points, pareto
    from stages.frontier import command

    exps = [{"revs": [_exp("1a3a4ce0", "k64", 64)], "executor": None, "name": "k64"},
            {"revs": [_exp("b4ac21a3", "k16", 16)], "executor": None, "name": "k16"}]
    show = [_exp("workspace", None, 64), _exp("0674ba41", "master", 32, exps)]
    points = frontier_points(show)
    assert sorted((p.name, p.l0) for p in points) == [("k16", 16.0), ("k64", 64.0), ("master", 32.0)]
    assert len(frontier_points(show, include_workspace=True)) == 4
    # (L0, FVU): (4, 0.5) is dominated by (3, 0.4); lower-is-better keeps a decreasing staircase.
    assert pareto([(1, 0.9), (3, 0.4), (4, 0.5), (8, 0.1)], higher_is_better=False) == [(1, 0.9), (3, 0.4), (8, 0.1)]
    assert pareto([(1, 0.2), (2, 0.1), (4, 0.8)], higher_is_better=True) == [(1, 0.2), (4, 0.8)]
    (tmp_path / "show.json").write_text(json.dumps(show))
    res = CliRunner().invoke(command, ["--exp-json", str(tmp_path / "show.json"), "--out", str(tmp_path / "f.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.json").write_text("[]")
    res = CliRunner().invoke(command, ["--exp-json", str(tmp_path / "empty.json"), "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "no experiment has an L0 in metrics/evaluate.json" in res.output


def test_frontier_finds_dvc_beside_its_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.venv/bin/sae frontier` without an activated venv: dvc is found next to the interpreter, not on PATH."""
    from pipeline.errors import UserError
    from stages.frontier import exp_show_json

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no venv on PATH
    monkeypatch.chdir(tmp_path)  # not a DVC repository: dvc runs and fails, rather than "command not found"
    with pytest.raises(UserError, match="dvc exp show --json failed"):
        exp_show_json(None)
