"""``sae train`` and ``sae evaluate`` with ``sae.arch: transcoder`` on the tiny Llama: the (mlp_in, mlp_out) pair
extracted in one forward trains one transcoder in the input hook's directory, and evaluate measures it against the
MLP output, with CE recovered / KL from the forward whose MLP is replaced by the transcoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from stage_workspace import invoke

from pipeline.activations import open_activations
from pipeline.evaluate import reconstruction_metrics
from pipeline.models import load_tokenizer
from pipeline.sae import load_sae
from pipeline.splice import splice_metrics, validation_contexts
from pipeline.testing import tiny_params, write_params
from pipeline.tokens import special_token_ids
from pipeline.transcoder_splice import mlp_replaced_metrics
from stages.cli import main

HOOK_IN, HOOK_OUT = "layers.1.mlp_in", "layers.1.mlp_out"
VAL = Path("data/activations/validation")


def test_train_and_evaluate_a_transcoder(tiny_llama: Path, labelled_corpus: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    params = tiny_params(tiny_llama, labelled_corpus, hooks=[HOOK_IN, HOOK_OUT],
                         sae={"arch": "transcoder", "expansion": 2, "k": 4},
                         train={"device": "cpu", "dtype": "float32", "batch_size": 64, "n_tokens": None, "log_every": 4,
                                "val_every": 8, "val_tokens": 128, "checkpoint_every": 0},
                         evaluate={"device": "cpu", "batch_size": 128, "n_splice_contexts": 4, "splice_batch_size": 2})
    write_params(Path("params.yaml"), params)
    invoke("prepare")
    invoke("extract")
    invoke("train")
    cfg = json.loads(Path("models/sae", HOOK_IN, "cfg.json").read_text())
    assert (cfg["architecture"], cfg["hook"], cfg["hook_out"], cfg["d_sae"]) == ("transcoder", HOOK_IN, HOOK_OUT, 64)
    assert not Path("models/sae", HOOK_OUT).exists()  # the target gets no dictionary of its own
    train = json.loads(Path("results/train.json").read_text())
    assert HOOK_IN in train and HOOK_OUT not in train and train[HOOK_IN]["val_fvu@2"] < 1.0

    invoke("evaluate")
    out = json.loads(Path("results/evaluate.json").read_text())
    assert HOOK_OUT not in out
    m = out[HOOK_IN]
    assert m["reconstruction_target"] == HOOK_OUT
    sae = load_sae(Path("models/sae", HOOK_IN))
    special = special_token_ids(load_tokenizer(str(tiny_llama)))  # what the stage leaves out (default)
    x, y = open_activations(VAL / HOOK_IN), open_activations(VAL / HOOK_OUT)
    direct = reconstruction_metrics(sae, x, batch_size=128, special_ids=special, target=y)
    assert m["fvu@3"] == pytest.approx(direct["fvu@3"], rel=1e-6) and m["fvu@3"] < 1.0  # against the MLP output
    # CE recovered of the forward whose MLP is replaced by the transcoder (not an SAE splice at mlp_in).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval().requires_grad_(False)
    contexts = validation_contexts(Path("data/tokens/contexts.parquet"), 4)
    replaced = mlp_replaced_metrics(model, HOOK_IN, sae.predict, contexts, 2, special)
    ce = [k for k in replaced if k.startswith(("ce_loss_recovered@", "kl_div@"))]
    assert len(ce) == 4 and all(m[k] == pytest.approx(replaced[k], rel=1e-6) for k in ce)  # @2 and the @1 reference
    with torch.no_grad():  # an SAE's splice at the same hook (what evaluate did before) gives other numbers
        as_sae = splice_metrics(model, HOOK_IN, sae, contexts, 2, special)
    # Measured: 0.39 recovered by the MLP-replaced forward, 0.0000 by an SAE splice at mlp_in.
    assert all(abs(as_sae[k] - m[k]) > 0.05 for k in ce if k.startswith("ce_loss_recovered@"))


def test_a_transcoder_without_its_pair_is_one_line(tiny_llama: Path, labelled_corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(Path("params.yaml"), tiny_params(tiny_llama, labelled_corpus, hooks=[HOOK_IN],
                                                  sae={"arch": "transcoder"}))
    res = CliRunner().invoke(main, ["train"])
    assert res.exit_code == 2
    assert res.output.strip() == (f"error: extract.hooks: '{HOOK_IN}' has no target: sae.arch 'transcoder' predicts "
                                  f"the MLP output from its input; add '{HOOK_OUT}' to extract.hooks")
