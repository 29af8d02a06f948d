"""SAE files: the native format, and SAELens / EleutherAI sparsify import and export.

Native (``save_sae``/``load_sae``): a directory with ``sae.safetensors`` (the module's parameters
and inference buffers, names as in the module) and ``cfg.json`` (``architecture``, every
``SAEConfig`` field, ``training``: the training params passed in, ``format_version``). The input
scaling is folded into the weights on save, so ``scaling_factor`` is 1.0 in the file and the SAE
works on raw activations. Both files are written atomically, weights first: a directory with a
``cfg.json`` is complete.

SAELens (``export_saelens``/``import_saelens``): ``cfg.json`` + ``sae_weights.safetensors`` with
W_enc[d_in, d_sae], b_enc[d_sae], W_dec[d_sae, d_in], b_dec[d_in], plus ``threshold[d_sae]``
(jumprelu) or b_gate/b_mag/r_mag (gated); architecture standard | topk | jumprelu | gated; the
encoder input is x - b_dec when ``apply_b_dec_to_input``. Transcoders both ways: SAELens' four transcoder
classes and sparsify ``transcode`` folders (:mod:`pipeline.sae.transcoder_io` out,
:mod:`pipeline.sae.published.transcoders` in).

sparsify (``export_sparsify``/``import_sparsify``): ``cfg.json`` (d_in, num_latents, k, activation
'topk', ...) + ``sae.safetensors`` with encoder.weight[num_latents, d_in], encoder.bias, W_dec
[num_latents, d_in], b_dec; latents = TopK(ReLU(encoder(x - b_dec))).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.devices import TORCH_DTYPES
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.sae import transcoder_io
from pipeline.sae.base import SAE, make_sae
from pipeline.sae.config import SAEConfig

FORMAT_VERSION = 1
WEIGHTS, CFG = "sae.safetensors", "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: SAE config file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON (corrupted SAE config)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: SAE weights file not found")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupted safetensors file ({str(e).splitlines()[0][:120]})") from None


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def folded_copy(sae: SAE) -> SAE:
    """A CPU copy of ``sae`` with the input scaling folded into its weights (the original is untouched)."""
    out = copy.deepcopy(sae).cpu()
    out.fold_scaling()
    out.cfg.dtype = {v: k for k, v in TORCH_DTYPES.items()}[out.dtype]  # follows .to(dtype)
    return out.eval()


def save_sae(sae: SAE, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
    """Write ``sae.safetensors`` + ``cfg.json`` into ``directory`` (created); returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sae = folded_copy(sae)
    state = sae.state_dict()
    _write_tensors(d / WEIGHTS, state)
    cfg = sae.cfg.to_dict()
    arch = cfg.pop("arch")
    atomic_write_json(d / CFG, {"architecture": arch, **cfg, "training": training or {},
                                "format_version": FORMAT_VERSION})
    return d


def read_sae_cfg(directory: str | Path) -> tuple[SAEConfig, dict[str, Any]]:
    """(config, training params) from a native SAE directory's ``cfg.json``."""
    path = Path(directory) / CFG
    data = _read_json(path)
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported SAE format_version {version!r} (expected {FORMAT_VERSION})")
    training = data.pop("training", {})
    if "architecture" not in data:
        raise UserError(f"{path}: missing 'architecture'")
    data["arch"] = data.pop("architecture")
    return SAEConfig.from_dict(data, source=str(path)), training


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a native SAE directory; returns the SAE in eval mode on ``device``."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: SAE directory not found")
    cfg, _ = read_sae_cfg(d)
    sae = make_sae(cfg, seed=0)  # weights are overwritten; a seed keeps the global RNG untouched
    _load_state(sae, _read_tensors(d / WEIGHTS), d / WEIGHTS)
    return sae.to(device).eval()


def _load_state(sae: SAE, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{path}: tensors do not match architecture {sae.cfg.arch!r} "
                        f"(missing {missing}, unexpected {extra})")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    sae.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False)


# ---- SAELens -------------------------------------------------------------------------------------
_TO_SAELENS = {"relu_l1": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
               "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu", "transcoder": "jumprelu_transcoder"}


def export_saelens(sae: SAE, directory: str | Path, model_name: str | None = None) -> Path:
    """Write ``sae`` in SAELens format. batchtopk and matryoshka_batchtopk are exported as jumprelu with their
    inference threshold (as SAELens saves its own: its ``matryoshka_batchtopk`` is a training-only class)."""
    arch = sae.cfg.arch
    if arch not in _TO_SAELENS:
        raise UserError(f"export_saelens: architecture {arch!r} has no SAELens equivalent "
                        f"(supported: {', '.join(sorted(_TO_SAELENS))})")
    s = folded_copy(sae)
    c = s.cfg
    if arch == "transcoder":  # MLP input -> MLP output: SAELens's transcoder classes
        tensors, tcfg = transcoder_io.saelens_files(s, model_name)
        Path(directory).mkdir(parents=True, exist_ok=True)
        _write_tensors(Path(directory) / SAELENS_WEIGHTS, tensors)
        atomic_write_json(Path(directory) / CFG, tcfg)
        return Path(directory)
    sd = s.state_dict()
    names = ["W_enc", "W_dec", "b_dec"] + (["b_gate", "b_mag", "r_mag"] if arch == "gated" else ["b_enc"])
    t: dict[str, torch.Tensor] = {n: sd[n] for n in names}
    if arch == "jumprelu":
        t["threshold"] = sd["log_threshold"].exp()
    elif arch in ("batchtopk", "matryoshka_batchtopk"):  # one shared threshold -> one per latent
        t["threshold"] = sd["threshold"].clamp_min(0.0).expand(c.d_sae).to(s.dtype)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_tensors(d / SAELENS_WEIGHTS, t)
    meta = {"hook_name": c.hook, "model_name": model_name, "sae_lens_version": "6.0.0",
            "sae_lens_training_version": "6.0.0"}
    cfg: dict[str, Any] = {
        "architecture": _TO_SAELENS[arch], "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype,
        "device": "cpu", "apply_b_dec_to_input": s.apply_b_dec, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": meta,
    }
    if arch == "topk":
        cfg["k"] = c.k
    atomic_write_json(d / CFG, cfg)
    return d


def import_saelens(directory: str | Path, hook: str | None = None) -> SAE:
    """Load an SAELens SAE directory as one of ours (eval mode, CPU): :mod:`pipeline.sae.published.saelens`.
    ``hook`` defaults to the file's, in this pipeline's names where there is an equivalent."""
    from pipeline.sae.published.hooknames import map_hook
    from pipeline.sae.published.saelens import read_saelens

    f = read_saelens(Path(directory))
    if getattr(f.sae, "is_transcoder", False):
        return _transcoder_hooks(f, hook)
    f.sae.cfg.hook = hook if hook is not None else (map_hook(f.hook) or f.hook or "")
    return f.sae


def _transcoder_hooks(f: Any, hook: str | None) -> SAE:
    """An imported transcoder's ``hook`` (what it reads) and ``hook_out`` (what it predicts): ``hook`` if given (its
    output the same block's MLP output), else the files', in this pipeline's names where there is an equivalent."""
    from pipeline.sae.published.hooknames import map_pair

    ours_in, ours_out = map_pair(f.hook, f.hook_out)
    f.sae.cfg.hook = hook if hook is not None else (ours_in or f.hook or "")
    f.sae.cfg.hook_out = transcoder_io.hook_out(hook) if hook is not None else (ours_out or f.hook_out or "")
    return f.sae


# ---- EleutherAI sparsify ---------------------------------------------------------------------------
def export_sparsify(sae: SAE, directory: str | Path) -> Path:
    """Write a topk SAE in sparsify format (the encoder input is always x - b_dec there)."""
    if sae.cfg.arch == "transcoder":  # sparsify's transcode (and skip_connection) layout
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        transcoder_io.write_sparsify(folded_copy(sae), d, _write_tensors)
        return d
    if sae.cfg.arch != "topk":
        raise UserError(f"export_sparsify: only 'topk' SAEs and transcoders have a sparsify equivalent, "
                        f"not {sae.cfg.arch!r}")
    s = folded_copy(sae)
    if not s.apply_b_dec:
        raise UserError("export_sparsify: sparsify always subtracts b_dec from the input (apply_b_dec_to_input)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_tensors(d / WEIGHTS, {"encoder.weight": s.W_enc.t(), "encoder.bias": s.b_enc,
                                 "W_dec": s.W_dec, "b_dec": s.b_dec})
    atomic_write_json(d / CFG, {
        "d_in": s.cfg.d_in, "num_latents": s.cfg.d_sae, "k": s.cfg.k, "activation": "topk",
        "expansion_factor": max(1, math.ceil(s.cfg.d_sae / s.cfg.d_in)), "normalize_decoder": True,
        "multi_topk": False, "skip_connection": False, "transcode": False,
    })
    return d


def import_sparsify(directory: str | Path, hook: str = "") -> SAE:
    """Load a sparsify TopK SAE directory (``cfg.json`` + ``sae.safetensors``) as a topk SAE, or a ``transcode`` one
    as a transcoder (its hooks from the folder name unless ``hook`` is given): :mod:`pipeline.sae.published.sparsify`."""
    from pipeline.sae.published.sparsify import read_sparsify

    f = read_sparsify(Path(directory))
    if getattr(f.sae, "is_transcoder", False):
        return _transcoder_hooks(f, hook or None)
    f.sae.cfg.hook = hook
    return f.sae
