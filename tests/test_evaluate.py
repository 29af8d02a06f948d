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
    assert m[metrics.NMSE] == pytest.approx(1 / 19)
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


def test_evaluate_stage_writes_metrics_and_density(tiny_llama: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.evaluate import command

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    write_activations(Path("data/activations/validation") / HOOK, rng.standard_normal((300, 32)).astype(np.float32),
                      hook=HOOK, dtype="float32")
    save_sae(_exact_sae(32), Path("models/sae") / HOOK)
    ids = _contexts(8, 10).numpy()
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
    out = json.loads(Path("metrics/evaluate.json").read_text())[HOOK]
    assert out[metrics.FVU] == pytest.approx(0.0, abs=1e-10)
    assert out[metrics.L0] == 32.0  # one of relu(x_i), relu(-x_i) per coordinate
    assert out[metrics.CE_LOSS_RECOVERED] == pytest.approx(1.0, abs=1e-4)
    assert out["n_tokens"] == 300 and out["n_splice_contexts"] == 4
    lines = Path(f"plots/evaluate/density_{HOOK}.csv").read_text().splitlines()
    assert lines[0] == "log10_frequency,n_latents" and len(lines) == 29
    assert sum(int(r.split(",")[1]) for r in lines[1:]) == 64  # every latent fires on ~half the tokens


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
    assert res.exit_code == 2 and "no experiment has metrics/evaluate.json" in res.output
