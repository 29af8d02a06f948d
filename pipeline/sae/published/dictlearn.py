"""dictionary_learning (Marks et al.; SAEBench's baselines) checkpoints: ``ae.pt`` (a state dict) + ``config.json``.

``config.json`` holds ``trainer``: ``dict_class``, ``activation_dim``, ``dict_size``, ``k``, ``layer``,
``lm_name``, ``submodule_name``. The classes, as in ``dictionary_learning/dictionary.py`` and
``trainers/{top_k,batch_top_k,matryoshka_batch_top_k}.py`` (``nn.Linear`` weights are [out, in], so the
encoder's is W_enc transposed and the decoder's W_dec transposed):

- ``AutoEncoder``: f = ReLU(encoder(x - bias)), x_hat = decoder(f) + bias  -> relu_l1, input centred
- ``AutoEncoderTopK``: TopK over ReLU(encoder(x - b_dec)) (its default, ``use_threshold=False``)  -> topk
- ``BatchTopKSAE``: at inference f = ReLU(pre) · 1{ReLU(pre) > threshold}, pre = encoder(x - b_dec)  -> batchtopk
- ``MatryoshkaBatchTopKSAE``: the same with W_enc/b_enc/W_dec/b_dec parameters; every group active
  -> matryoshka_batchtopk with its group sizes (batchtopk where our fraction rule cannot give them back)
- ``JumpReluAutoEncoder``: f = ReLU(pre · 1{pre > threshold}), input centred only if apply_b_dec_to_input  -> jumprelu
- ``GatedAutoEncoder``: gate / magnitude paths sharing ``encoder``, ``decoder_bias`` centring the input  -> gated
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.sae.config import SAEConfig
from pipeline.sae.io import _read_json
from pipeline.sae.published.common import Foreign, build, dtype_name, log_threshold, need

WEIGHTS, CFG = "ae.pt", "config.json"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: SAE weights file not found")
    try:  # tensors only: weights_only refuses pickled code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a readable torch state dict ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return dict(state)


def _matryoshka(sizes: list[int], d_sae: int) -> dict:
    """Our ``matryoshka_batchtopk`` keeps the nested groups (its levels, for the report and a further fine-tune) when
    its fraction rule gives back exactly these group sizes; else plain ``batchtopk``, whose inference is the same."""
    from pipeline.sae.base import ARCHS

    if "matryoshka_batchtopk" not in ARCHS:
        return {}
    from pipeline.sae.matryoshka import group_sizes

    fractions = [g / d_sae for g in sizes]
    if group_sizes(fractions, d_sae) != sizes:
        return {}
    return {"arch": "matryoshka_batchtopk", "matryoshka_fractions": fractions}


def read_dictionary_learning(d: Path) -> Foreign:
    """Import a dictionary_learning checkpoint folder (eval mode, CPU)."""
    cpath, wpath = d / CFG, d / WEIGHTS
    trainer = _read_json(cpath).get("trainer") or {}
    cls = trainer.get("dict_class")
    t = _read_state(wpath)
    if cls == "AutoEncoder":
        need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), wpath)
        ours = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].t(),
                "b_dec": t["bias"]}
        arch, extra = "relu_l1", {}
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"), wpath)
        ours = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].t(),
                "b_dec": t["b_dec"]}
        arch, extra = ("topk", {}) if cls == "AutoEncoderTopK" else ("batchtopk", {})
        if arch == "batchtopk":
            need(t, ("threshold",), wpath)
            ours["threshold"] = t["threshold"].float().reshape(())
    elif cls == "MatryoshkaBatchTopKSAE":
        need(t, ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"), wpath)
        ours = {n: t[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        ours["threshold"] = t["threshold"].float().reshape(())
        arch, extra = "batchtopk", {"group_sizes": [int(g) for g in t["group_sizes"].tolist()]}
    elif cls == "JumpReluAutoEncoder":
        need(t, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), wpath)
        ours = {n: t[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        ours["log_threshold"] = log_threshold(t["threshold"])
        arch, extra = "jumprelu", {}
    elif cls == "GatedAutoEncoder":
        need(t, ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"), wpath)
        ours = {"W_enc": t["encoder.weight"].t(), "W_dec": t["decoder.weight"].t(), "b_dec": t["decoder_bias"],
                "r_mag": t["r_mag"], "b_gate": t["gate_bias"], "b_mag": t["mag_bias"]}
        arch, extra = "gated", {}
    else:
        raise UserError(f"{cpath}: dictionary_learning dict_class {cls!r} is not supported (AutoEncoder, "
                        "AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder)")
    d_sae, d_in = ours["W_dec"].shape
    for key, want in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.get(key) is not None and int(trainer[key]) != want:
            raise UserError(f"{cpath}: trainer.{key} is {trainer[key]}, but {wpath.name} holds {want}")
    k = int(t["k"]) if "k" in t else 1
    apply = bool(trainer.get("apply_b_dec_to_input", False)) if arch == "jumprelu" else True
    knobs = _matryoshka(extra.get("group_sizes"), int(d_sae)) if "group_sizes" in extra else {}
    cfg = SAEConfig(arch=knobs.pop("arch", arch), d_in=int(d_in), d_sae=int(d_sae), k=min(k, int(d_sae)), hook="",
                    dtype=dtype_name(ours["W_dec"]), apply_b_dec_to_input=apply, **knobs)
    sae = build(cfg, ours, wpath)
    layer, sub = trainer.get("layer"), trainer.get("submodule_name")
    hook = sub if sub else (f"resid_post_layer_{layer}" if layer is not None else None)
    return Foreign(sae, "dictionary_learning", hook, trainer.get("lm_name"), [cpath, wpath],
                   {"dict_class": cls, **extra})
