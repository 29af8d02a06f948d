"""Gemma Scope (Lieberum et al. 2024) and Gemma Scope 2 JumpReLU SAEs, from their documented layouts.

Gemma Scope 1 (``google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}``): one folder per SAE,
``layer_{i}/width_{16k,...}/average_l0_{n}/params.npz`` with W_enc[d_model, d_sae], W_dec[d_sae, d_model],
b_enc[d_sae], b_dec[d_model], threshold[d_sae]; no config file: the layer comes from the folder names and
the site and model from the repository name. Gemma Scope 2 (``google/gemma-scope-2-*``): ``params.safetensors``
with the same tensors under lower-case names (w_enc, w_dec, ...) and a ``config.json`` (``hf_hook_point_in``,
``model_name``, ``affine_connection``); transcoders add ``hf_hook_point_out`` and, for the affine variants, an
``affine_skip_connection[d_in, d_out]``. Transcoders of both (``...-transcoders`` repositories, ``transcoder/``
folders) are refused: they predict the MLP output after Gemma's post-MLP norm, not this pipeline's ``mlp_out``.

Both encode f = JumpReLU_theta(x @ W_enc + b_enc) = (x W_enc + b_enc) · 1{. > theta}: the input is *not*
centred by b_dec (apply_b_dec_to_input false); decode f @ W_dec + b_dec.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.sae.config import SAEConfig
from pipeline.sae.io import _read_json, _read_tensors
from pipeline.sae.published.common import Foreign, build, dtype_name, log_threshold, need, shape_of

NPZ, V2_WEIGHTS, V2_CFG = "params.npz", "params.safetensors", "config.json"
_SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_NOT_MLP_OUT = ("this pipeline's layers.{i}.mlp_out is not (it is taken before the norm): no exact transcoder "
                "import; residual-stream SAEs only")


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path) as data:
            return {k: torch.from_numpy(np.asarray(data[k]).copy()) for k in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npz file ({str(e).splitlines()[0][:120]})") from None


def _layer(d: Path) -> int | None:
    found = re.findall(r"layer_(\d+)", d.as_posix())
    return int(found[-1]) if found else None  # the innermost layer_{i} folder


def _jumprelu(t: dict[str, torch.Tensor], path: Path) -> SAEConfig:
    need(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path)
    d_in, d_sae = t["W_enc"].shape if t["W_enc"].ndim == 2 else (0, 0)
    if not d_in:
        raise UserError(f"{path}: tensor 'W_enc' has shape {tuple(t['W_enc'].shape)}, expected [d_model, d_sae]")
    shape_of(t["W_dec"], (d_sae, d_in), "W_dec", path)
    shape_of(t["threshold"], (d_sae,), "threshold", path)
    t["log_threshold"] = log_threshold(t.pop("threshold"))
    return SAEConfig(arch="jumprelu", d_in=int(d_in), d_sae=int(d_sae), hook="", dtype=dtype_name(t["W_enc"]),
                     apply_b_dec_to_input=False)


def read_gemmascope(d: Path) -> Foreign:
    """Import a Gemma Scope 1 (``params.npz``) or 2 (``params.safetensors`` + ``config.json``) SAE folder."""
    if (d / NPZ).is_file():
        return _read_v1(d)
    if (d / V2_WEIGHTS).is_file():
        return _read_v2(d)
    raise UserError(f"{d}: no {NPZ} (Gemma Scope) or {V2_WEIGHTS} (Gemma Scope 2) in this folder")


def _read_v1(d: Path) -> Foreign:
    path = d / NPZ
    if re.search(r"gemma-scope-[^/]*-transcoders", d.as_posix()):
        raise UserError(f"{d}: a Gemma Scope transcoder predicts Gemma 2's hook_mlp_out, after its post-MLP norm, "
                        f"which {_NOT_MLP_OUT}")
    t = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in _read_npz(path).items()}
    cfg = _jumprelu(t, path)
    sae = build(cfg, {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "log_threshold")}, path)
    m = re.search(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)", d.as_posix())
    layer = _layer(d)
    if "embedding" in d.as_posix():
        raise UserError(f"{d}: Gemma Scope embedding SAEs are not supported (their input scale is not this "
                        "pipeline's 'embed' hook's)")
    hook = f"blocks.{layer}.{_SITES[m.group(3)]}" if m and layer is not None else None
    model = f"google/gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "") if m else None
    return Foreign(sae, "gemmascope", hook, model, [path], {"version": 1})


def _read_v2(d: Path) -> Foreign:
    path = d / V2_WEIGHTS
    raw = _read_json(d / V2_CFG) if (d / V2_CFG).is_file() else {}
    if raw.get("architecture", "jump_relu") != "jump_relu":
        raise UserError(f"{d / V2_CFG}: architecture {raw.get('architecture')!r} is not supported (jump_relu)")
    t = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in _read_tensors(path).items()}
    if "affine_skip_connection" in t or raw.get("hf_hook_point_out") or raw.get("affine_connection"):
        raise UserError(f"{d}: a Gemma Scope 2 transcoder (reads {raw.get('hf_hook_point_in')}, writes "
                        f"{raw.get('hf_hook_point_out')}{', affine skip' if 'affine_skip_connection' in t else ''}) "
                        f"predicts the MLP output after Gemma 3's post-MLP norm, which {_NOT_MLP_OUT}")
    cfg = _jumprelu(t, path)
    sae = build(cfg, {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "log_threshold")}, path)
    hook = raw.get("hf_hook_point_in")
    if hook and ("pre_feedforward_layernorm" in hook or "post_feedforward_layernorm" in hook or "o_proj" in hook):
        raise UserError(f"{d}: hook {hook} (after Gemma's norms / before o_proj) is not one of this pipeline's hooks; "
                        "residual-stream SAEs (model.layers.{i}.output) only")
    if hook is None and (layer := _layer(d)) is not None and "resid_post" in d.as_posix():
        hook = f"model.layers.{layer}.output"
    model = raw.get("model_name")
    if model:  # the files' names for the model, as SAELens' own gemma_3 loader normalises them
        model = (model if "/" in model else f"google/{model}").replace("-v3", "-3")
    files = [path] + ([d / V2_CFG] if (d / V2_CFG).is_file() else [])
    return Foreign(sae, "gemmascope", hook, model, files, {"version": 2})
