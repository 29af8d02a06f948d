"""Adding an SAE architecture is one module: dropped into ``pipeline/sae/``, it is registered, accepted as
``sae.arch`` and trained by ``sae train`` through the shared training step, with no other file touched."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.params import Params, to_dict
from pipeline.synthetic import write_synthetic_activations

ROOT = Path(__file__).resolve().parents[1]
HOOK = "layers.1.resid_post"

# A ReLU SAE with a tanh sparsity penalty (saturating, so large activations are not shrunk as by L1): only its
# encode and its penalty are written here; scaling, decoding, the reconstruction, firing and output are the base's.
MODULE = '''
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.sae import batch
from pipeline.sae.base import SAE, Term, register
from pipeline.sae.config import SAEConfig


@register("tanh_l1")
class TanhSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._init_linear(generator, decoder_norm=0.1)

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        return (self.center(xs) @ self.W_enc + self.b_enc).relu()

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        penalty = batch.mean((4.0 * f * self.W_dec.norm(dim=-1)).tanh().sum(-1))
        return [Term("tanh", penalty, self.cfg.l1_coeff * self._warmup(step, total_steps))]
'''


def test_a_new_architecture_in_one_file_trains_through_sae_train(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy of the code with the one new file, nothing else changed
    for package in ("pipeline", "stages"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "pipeline" / "sae" / "tanh_l1.py").write_text(MODULE)

    work = tmp_path / "work"
    for split, n, sample in (("train", 2048, 0), ("validation", 512, 1)):
        write_synthetic_activations(work / "data/activations" / split / HOOK, n, 16, n_features=24, k_true=2, seed=4,
                                    sample_seed=sample, hook=HOOK, dtype="float32", split=split)
    p = to_dict(Params())
    p["extract"]["hooks"] = [HOOK]
    p["sae"].update(arch="tanh_l1", expansion=4, l1_coeff=0.1)
    p["train"].update(device="cpu", dtype="float32", batch_size=64, lr=1e-2, n_tokens=None, log_every=8, val_every=16,
                      val_tokens=512, checkpoint_every=0, dead_window_tokens=1024)
    (work / "params.yaml").write_text(yaml.safe_dump(p))

    def sae(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "stages", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)

    res = sae("train")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((work / "models/sae" / HOOK / "cfg.json").read_text())
    assert cfg["architecture"] == "tanh_l1" and cfg["d_sae"] == 64
    metrics = json.loads((work / "results/train.json").read_text())[HOOK]
    curve = list(csv.DictReader((work / "plots/train" / f"{HOOK}.csv").open()))
    assert metrics["steps"] == 32 and len(curve) == 4  # the trainer's curve: every 8 steps
    first_fvu = float(curve[0]["fvu"])
    assert metrics["val_fvu@2"] < 0.3 * first_fvu, (first_fvu, metrics)  # it learned (measured: 0.94 -> 0.084)

    # The registry is the list of choices: an unknown name is one line naming every architecture, the new one too.
    res = sae("train", "--set", "sae.arch=tanh")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert "sae.arch: 'tanh' is not an architecture" in line and "tanh_l1" in line and "topk" in line, line
