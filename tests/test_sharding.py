"""Latent-dimension sharding (``train.parallel: latents``) on CPU with gloo, 127.0.0.1 only.

Two processes, each holding half of a 256 -> 8,192 TopK or BatchTopK SAE's latents, train the one-process SAE up
to float32 rounding (4 steps; AuxK over dead latents and gradient clipping active), with their replicated
gradients bitwise equal; a stopped sharded run resumes to the same bits; one process cannot resume it. The global
selection's tie rule is checked on N slices simulated in one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shard_worker import D_SAE, SEED, TRAIN, sae_config, train_params

from pipeline import sharding, sharding_step
from pipeline.activations import open_activations
from pipeline.checkpoint import CHECKPOINT_FILE
from pipeline.distributed import Ranks
from pipeline.errors import UserError
from pipeline.sae import load_sae, make_sae, ops
from pipeline.synthetic import write_synthetic_activations
from pipeline.train import train_sae
from pipeline.train_setup import make_optimizer, train_fingerprint

WORKER = Path(__file__).with_name("shard_worker.py")
D_IN = 256


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on 127.0.0.1 (one thread per process: the CI box has 2 cores)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(WORKER), *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def weights(d: Path) -> dict[str, torch.Tensor]:
    return dict(load_sae(d).state_dict())


# ---- the selection, N slices simulated in one process -------------------------------------------------------
def sharded_mask(values: torch.Tensor, k: int, per_row: bool, n: int) -> torch.Tensor:
    """What :func:`sharding_step.select` computes on ``n`` processes, its collectives done by hand."""
    slices = values.chunk(n, dim=1)
    gathered = torch.stack([sharding_step.candidates(v, k, per_row) for v in slices])
    t = sharding_step.threshold(gathered, k, per_row)
    counts = torch.stack([sharding_step.tie_counts(v, t) for v in slices])
    return torch.cat([sharding_step.keep_mask(v, t, counts, r, k, per_row) for r, v in enumerate(slices)], dim=1)


def lowest_index_top(values: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """The k largest (per row, or of the whole batch, row-major), equal values taken lowest index first."""
    flat = values if per_row else values.reshape(1, -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for i, row in enumerate(flat.tolist()):
        order = sorted(range(len(row)), key=lambda j, row=row: (-row[j], j))
        mask[i, order[:k]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("per_row", [True, False], ids=["topk", "batchtopk"])
def test_ties_at_the_threshold_keep_exactly_k_lowest_index_first(per_row: bool, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (6, 16), generator=g).float()  # many equal values at every threshold
    k = 3 if per_row else 3 * 6
    got = sharded_mask(values, k, per_row, n)
    assert torch.equal(got, lowest_index_top(values, k, per_row))
    assert (got.sum(-1) == 3).all() if per_row else int(got.sum()) == k


@pytest.mark.parametrize("n", [2, 4])
def test_without_ties_the_selection_is_the_one_process_topk(n: int) -> None:
    pre = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).exp()  # positive: ReLU keeps every pick
    assert torch.equal(sharded_mask(pre, 5, True, n), ops.topk_activation(pre, 5) != 0)
    top = pre.flatten().topk(5 * 8).indices
    assert torch.equal(sharded_mask(pre, 5 * 8, False, n).flatten(), torch.zeros(8 * 64).bool().index_fill(0, top, True))


# ---- what is refused, and the state's slices ------------------------------------------------------------------
def test_unsupported_settings_are_one_line() -> None:
    two = Ranks(0, 2, 0)
    latents = train_params()
    assert sharding.plan(sae_config("topk", 16, 64), train_params(parallel="data"), two) is None
    assert sharding.plan(sae_config("topk", 16, 64), latents, Ranks()) is None  # one process: the plain run
    with pytest.raises(UserError, match=r"^train\.parallel: latents shards sae\.arch topk and batchtopk, not 'gated'"):
        sharding.plan(sae_config("gated", 16, 64), latents, two)
    with pytest.raises(UserError, match=r"sae\.d_sae 63 is not divisible by the 2 training processes"):
        sharding.plan(sae_config("topk", 16, 63), latents, two)
    with pytest.raises(UserError, match=r"^train\.kernels: 'sparse' is not available with train\.parallel: latents"):
        sharding.plan(sae_config("topk", 16, 64), train_params(kernels="sparse"), two)


def test_the_slices_of_model_and_adam_state_make_the_whole() -> None:
    cfg = sae_config("batchtopk", 8, 32)
    whole = make_sae(cfg, seed=1)
    opt = make_optimizer(whole, train_params(), torch.device("cpu"))
    whole.training_loss(torch.randn(4, 8), 0, 1).loss.backward()
    opt.step()
    names = [n for n, _ in whole.named_parameters()]
    parts = [sharding.LatentShards(cfg, r, 2) for r in range(2)]
    models = [p.slice_model(whole.state_dict()) for p in parts]
    optims = [p.slice_optimizer(opt.state_dict(), names) for p in parts]
    for name, t in whole.state_dict().items():
        dim = sharding.SHARD_DIMS.get(name)
        got = torch.cat([m[name] for m in models], dim) if dim is not None else models[1][name]
        assert torch.equal(got, t), name
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            dim = sharding.SHARD_DIMS.get(name)
            got = torch.cat([o["state"][i][key] for o in optims], dim) if dim is not None else optims[1]["state"][i][key]
            assert torch.equal(got, opt.state_dict()["state"][i][key]), (name, key)
    assert parts[1].lo == 16 and parts[1].width == 16 and models[0]["W_enc"].shape == (8, 16)


def test_the_fingerprint_names_the_parallelism_only_when_latents(tmp_path: Path) -> None:
    write_synthetic_activations(tmp_path, n_tokens=64, d_model=8, n_features=16, k_true=2, seed=0, dtype="float32")
    ds, cfg, cpu = open_activations(tmp_path), sae_config("topk", 8, 32), torch.device("cpu")
    assert "train.parallel" not in train_fingerprint(cfg, train_params(parallel="data"), 0, ds, cpu)
    assert train_fingerprint(cfg, train_params(), 0, ds, cpu)["train.parallel"] == '"latents"'


# ---- two processes under torchrun -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("acts") / "train"
    write_synthetic_activations(root, n_tokens=1024, d_model=D_IN, n_features=1024, k_true=8, seed=5, shard_rows=256,
                                dtype="float32")
    return root


@pytest.fixture(scope="module")
def two_shards(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """topk and batchtopk trained by 2 latent shards; then topk again, stopped after step 3 (checkpoint at 2), as a
    kill would stop it, and resumed by a new run in the same processes."""
    out = tmp_path_factory.mktemp("shards")
    res = torchrun("--data", str(data), "--out", str(out), "--variants", "topk,batchtopk,topk-stopped", "--stop-at", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_two_shards_train_the_one_process_sae(arch: str, data: Path, two_shards: Path, tmp_path: Path) -> None:
    ds = open_activations(data)
    one = train_sae(ds, sae_config(arch, D_IN), train_params(parallel="data"), tmp_path / "one", tmp_path / "ckpt",
                    seed=SEED, val_dataset=ds).summary
    training = json.loads((two_shards / arch / "cfg.json").read_text())["training"]
    assert training["world_size"] == 2 and training["parallel"] == "latents" and training["kernels"] == "torch"
    ref, got = weights(tmp_path / "one"), weights(two_shards / arch)
    assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in got.items()}  # the whole SAE
    assert got["W_enc"].shape == (D_IN, D_SAE)
    # Measured after 4 steps: W_enc 2.7e-5 (topk) / 1.1e-4 (batchtopk) apart, W_dec 1.1e-5, b_dec 1.2e-7: Adam
    # divides each gradient by its RMS, so the decoder sum's float order grows to ~lr·1e-2 where a gradient is
    # nearly 0. Local top-k without the global threshold: 4e-3 .. 7e-2.
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=5e-4, msg=f"{arch}: {k}")
    # Validation (rank 0, on the gathered SAE) and the curve: the one-process numbers.
    two = json.loads((two_shards / f"{arch}.summary.json").read_text())
    assert two.keys() == one.keys() and "val_fvu@2" in two
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    # Replicated gradients and tensors (b_dec, BatchTopK's threshold): the same bits on both processes, every step.
    per_rank = [(two_shards / f"{arch}.replicated.{r}").read_text() for r in range(2)]
    assert per_rank[0] == per_rank[1] and len(per_rank[0].splitlines()) == TRAIN["n_tokens"] // TRAIN["batch_size"]


def test_stopped_sharded_run_resumes_bit_identical(data: Path, two_shards: Path) -> None:
    at_stop = two_shards / "topk-stopped_ckpt_at_stop"
    state = torch.load(at_stop / CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 2 and not state["complete"] and state["cursor"]["world_size"] == 2
    assert state["model"]["W_dec"].shape == (D_SAE, D_IN)  # rank 0 gathered the whole SAE: one-process layout
    assert state["optimizer"]["state"][0]["exp_avg"].shape == state["model"]["W_dec"].shape
    with pytest.raises(UserError, match=r"state\.pt: written by a run of 2 processes, this run has 1; resume with 2"):
        train_sae(open_activations(data), sae_config("topk", D_IN), train_params(), two_shards / "x", at_stop, seed=SEED)
    assert (two_shards / "topk-stopped" / "sae.safetensors").read_bytes() == \
        (two_shards / "topk" / "sae.safetensors").read_bytes()
    assert (two_shards / "topk-stopped.csv").read_text() == (two_shards / "topk.csv").read_text()
