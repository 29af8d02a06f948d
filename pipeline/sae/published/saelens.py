"""SAELens SAE folders (``cfg.json`` + ``sae_weights.safetensors``) and its release / id registry.

Tensors: W_enc[d_in, d_sae], b_enc[d_sae], W_dec[d_sae, d_in], b_dec[d_in], plus ``threshold[d_sae]``
(jumprelu) or b_gate / b_mag / r_mag (gated). The encoder reads x - b_dec when ``apply_b_dec_to_input``.
Transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_(skip_)transcoder``): :mod:`.transcoders`.
Configs before SAELens 6 are flat and use other names (``hook_point``, ``activation_fn_str``, TopK as
``architecture: standard`` with ``activation_fn_kwargs: {k}``), as SAELens' own ``handle_config_defaulting``
reads them; 6.x nests the hook and model under ``metadata``. Folded on import, so encode/decode equal
SAELens' own: ``rescale_acts_by_decoder_norm`` (TopK ranks pre-activations times decoder norms: W_enc and
b_enc take the norms, W_dec rows become unit) and an older ``finetuning_scaling_factor`` (multiplies the
latents before decoding: into W_dec's rows).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.sae.config import SAEConfig
from pipeline.sae.io import _read_json, _read_tensors
from pipeline.sae.published.common import Foreign, build, dtype_name, log_threshold, need, shape_of
from pipeline.sae.published.transcoders import SAELENS_ARCHS, read_saelens_transcoder

log = logging.getLogger(__name__)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
_ARCHS = {"standard": "relu_l1", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
# Releases whose files another converter of SAELens reads, and the format that converter's files are in.
CONVERSIONS = {None: "saelens", "gemma_2": "gemmascope", "gemma_3": "gemmascope", "dictionary_learning_1":
               "dictionary_learning"}


def _flat_cfg(raw: dict[str, Any]) -> dict[str, Any]:
    """Old key names -> new (SAELens' handle_config_defaulting), ``metadata`` merged in."""
    cfg = {**(raw.get("metadata") or {}), **{k: v for k, v in raw.items() if k != "metadata"}}
    for old, new in (("hook_point", "hook_name"), ("activation_fn_str", "activation_fn")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)
    return cfg


def read_saelens(d: Path) -> Foreign:
    """Import an SAELens SAE folder (eval mode, CPU); its encode/decode equal SAELens' ``SAE.load_from_disk``."""
    path = d / CFG
    raw = _read_json(path)
    c = _flat_cfg(raw)
    arch = c.get("architecture", "standard")
    act = c.get("activation_fn", "relu")
    if arch == "standard" and act == "topk":  # pre-6.0 TopK SAEs
        arch = "topk"
    ours = _ARCHS.get(arch)
    if ours is None and arch not in SAELENS_ARCHS:
        raise UserError(f"{path}: SAELens architecture {arch!r} is not supported (supported: "
                        f"{', '.join((*_ARCHS, *SAELENS_ARCHS))})")
    if arch == "standard" and act not in ("relu", None):
        raise UserError(f"{path}: activation_fn {act!r} is not supported for a standard SAE (relu, topk)")
    norm = c.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(f"{path}: normalize_activations={norm!r} is not supported: it rescales each input at run time "
                        "(or needs a factor this file does not hold); fold it into the weights first")
    if c.get("hook_head_index") is not None or (c.get("reshape_activations") or "none") != "none":
        raise UserError(f"{path}: SAEs on one attention head / hook_z are not supported (no such hook here)")
    try:
        d_in, d_sae = int(c["d_in"]), int(c["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: needs integer 'd_in' and 'd_sae'") from None
    k = int(c.get("k") or (c.get("activation_fn_kwargs") or {}).get("k") or 1)
    wpath = d / WEIGHTS
    t = _read_tensors(wpath)
    if arch in SAELENS_ARCHS:
        return read_saelens_transcoder(c, t, path, wpath)
    need(t, ("W_enc", "W_dec", "b_dec"), wpath)
    W_enc = shape_of(t.pop("W_enc"), (d_in, d_sae), "W_enc", wpath)
    W_dec = shape_of(t.pop("W_dec"), (d_sae, d_in), "W_dec", wpath)
    ts: dict[str, torch.Tensor] = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": t.pop("b_dec")}
    for name in ("b_enc", "b_gate", "b_mag", "r_mag"):
        if name in t:
            ts[name] = t.pop(name)
    if "scaling_factor" in t:  # pre-3.0 files: an all-ones (already folded) factor
        if not torch.allclose(t["scaling_factor"].float(), torch.ones(1)):
            raise UserError(f"{wpath}: a non-trivial 'scaling_factor' tensor is not supported")
        del t["scaling_factor"]
    fsf = t.pop("finetuning_scaling_factor", None)
    if fsf is not None:  # decode(f) = (f * fsf) @ W_dec + b_dec
        ts["W_dec"] = ts["W_dec"] * fsf.to(W_dec.dtype)[:, None]
    if ours == "jumprelu":
        need(t, ("threshold",), wpath)
        ts["log_threshold"] = log_threshold(t.pop("threshold"))
    if arch == "topk" and c.get("rescale_acts_by_decoder_norm"):
        norms = ts["W_dec"].float().norm(dim=-1)  # [d_sae]
        ts["W_enc"] = (ts["W_enc"].float() * norms).to(W_enc.dtype)
        ts["b_enc"] = (ts["b_enc"].float() * norms).to(W_enc.dtype)
        ts["W_dec"] = (ts["W_dec"].float() / norms[:, None]).to(W_dec.dtype)
    t.pop("log_feature_sparsity", None)
    cfg = SAEConfig(arch=ours, d_in=d_in, d_sae=d_sae, k=k, hook="", dtype=dtype_name(W_enc),
                    apply_b_dec_to_input=bool(c.get("apply_b_dec_to_input", True)))
    notes = {"architecture": arch, "sae_lens_version": c.get("sae_lens_version") or c.get("sae_lens_training_version")}
    sae = build(cfg, ts, wpath) if not t else None
    if sae is None:
        raise UserError(f"{wpath}: unexpected tensors {sorted(t)} for a {arch} SAE")
    return Foreign(sae, "saelens", c.get("hook_name"), c.get("model_name"), [path, wpath], notes)


def registry_path() -> Path | None:
    """``pretrained_saes.yaml`` of the installed ``sae-lens`` (read as data: the package itself is never imported)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    return p if p.is_file() else None


def resolve_release(release: str, sae_id: str, key: str = "sae.source") -> tuple[str, str, str, str | None]:
    """SAELens ``release`` / ``sae_id`` -> (hub repo id, path in the repo, format, model name).

    Needs the optional extra (``pip install sae-pipeline[saelens]``) for the registry file."""
    import yaml

    p = registry_path()
    if p is None:
        raise UserError(f"{key}: saelens:{release}/{sae_id} needs the sae-lens package for its release registry "
                        "(pip install 'sae-pipeline[saelens]'), or name the files with hf:<repo>/<path>")
    text = p.read_text()
    # The registry is ~40k lines (parsing it whole takes seconds): only this release's top-level block is parsed.
    m = re.search(rf"^{re.escape(release)}:\n(?:(?:[ \t].*)?\n)*", text, flags=re.M)
    entry = (yaml.safe_load(m.group(0)) or {}).get(release) if m else None
    if entry is None:
        close = sorted(r for r in re.findall(r"^([\w.-]+):", text, flags=re.M) if release.split("-")[0] in r)[:5]
        raise UserError(f"{key}: SAELens release {release!r} not found in {p.name} (e.g. {', '.join(close) or 'none'})")
    conv = entry.get("conversion_func")
    if conv not in CONVERSIONS:
        raise UserError(f"{key}: release {release!r} is stored in a layout this pipeline does not import "
                        f"(SAELens converter {conv!r}; supported: SAELens native, gemma_2, gemma_3, dictionary_learning_1)")
    processed = (entry.get("config_overrides") or {}).get("model_from_pretrained_kwargs") or {}
    if processed.get("center_writing_weights"):
        log.warning("%s: release %s was trained on TransformerLens-processed activations (center_writing_weights: each "
                    "residual vector minus its mean over d_model); this pipeline records them unprocessed, so the "
                    "reconstruction metrics also count the mean the SAE was never asked to reconstruct", key, release)
    for s in entry.get("saes", []):
        if s.get("id") == sae_id:
            return entry["repo_id"], s.get("path", sae_id), CONVERSIONS[conv], entry.get("model")
    ids = [s.get("id") for s in entry.get("saes", [])]
    raise UserError(f"{key}: release {release!r} has no SAE {sae_id!r} ({len(ids)} ids, e.g. {', '.join(map(str, ids[:3]))})")
