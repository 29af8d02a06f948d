"""Published transcoders in (SAELens and EleutherAI sparsify), as this pipeline's ``transcoder``.

A transcoder reads a block's MLP input and predicts its MLP output (:mod:`pipeline.sae.transcoder`). The files,
as the packages' own classes read them (sae-lens ``saes/transcoder.py``, eai-sparsify ``SparseCoder``):

- SAELens ``transcoder`` / ``skip_transcoder`` (ReLU) and ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``:
  W_enc[d_in, d_sae], b_enc[d_sae], W_dec[d_sae, d_out], b_dec[d_out], threshold[d_sae] (JumpReLU),
  W_skip[d_out, d_in] (skip: ``+ x @ W_skip.T``); f = ReLU(pre) · 1{pre > threshold}, pre = x @ W_enc + b_enc (no
  b_dec on the input: SAELens refuses ``apply_b_dec_to_input`` for transcoders). ReLU is the same with threshold
  0. Both become ``transcoder_activation: jumprelu`` (a threshold per latent), so encode and predict are the same
  arithmetic in the same order: bit-for-bit equal in float32.
- sparsify ``transcode: true``: latents = TopK(ReLU(encoder(x))) (no b_dec on the input), prediction = latents @
  W_dec + b_dec (+ ``x @ W_skip.mT`` with ``skip_connection``) -> ``transcoder_activation: topk``.

The metadata's hooks (SAELens ``hook_name`` / ``hook_name_out``; sparsify's folder name, one module whose input
and output are the pair) are mapped by :func:`pipeline.sae.published.hooknames.map_pair`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.sae.config import SAEConfig
from pipeline.sae.published.common import Foreign, build, dtype_name, need, shape_of

SAELENS_ARCHS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
_K = 32  # k means nothing to a JumpReLU transcoder (it has thresholds); any valid value, as the params' default


def read_saelens_transcoder(c: dict[str, Any], t: dict[str, torch.Tensor], path: Path, wpath: Path) -> Foreign:
    """An SAELens transcoder folder's flattened config ``c`` (``cfg.json`` at ``path``) and tensors ``t``."""
    arch = c["architecture"]
    if c.get("apply_b_dec_to_input"):
        raise UserError(f"{path}: apply_b_dec_to_input is true, which a transcoder cannot have (b_dec is in the "
                        "output space; SAELens refuses it too)")
    skip, jump = "skip" in arch, arch.startswith("jumprelu")
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if jump else ()) + (("W_skip",) if skip else ())
    need(t, names, wpath)
    extra = sorted(set(t) - set(names) - {"log_feature_sparsity"})
    if extra:
        raise UserError(f"{wpath}: unexpected tensors {extra} for a SAELens {arch}")
    for name in ("W_enc", "W_dec"):
        if t[name].ndim != 2:
            raise UserError(f"{wpath}: tensor {name!r} has shape {tuple(t[name].shape)}, expected a matrix")
    (d_in, d_sae), d_out = t["W_enc"].shape, int(t["W_dec"].shape[1])
    for key, have in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if c.get(key) is not None and int(c[key]) != have:
            raise UserError(f"{path}: {key} is {c[key]}, but {wpath.name} holds {have}")
    if d_out != d_in:
        raise UserError(f"{path}: a transcoder from width {d_in} to {d_out}: this pipeline's transcoders predict the "
                        "MLP output of the block whose MLP input they read (d_out = d_in)")
    ours = {"W_enc": shape_of(t["W_enc"], (d_in, d_sae), "W_enc", wpath),
            "b_enc": shape_of(t["b_enc"], (d_sae,), "b_enc", wpath),
            "W_dec": shape_of(t["W_dec"], (d_sae, d_in), "W_dec", wpath),
            "b_dec": shape_of(t["b_dec"], (d_in,), "b_dec", wpath),
            # ReLU(pre) is ReLU(pre)·1{pre > 0}: a JumpReLU at threshold 0
            "threshold": shape_of(t["threshold"], (d_sae,), "threshold", wpath).float() if jump
            else torch.zeros(d_sae)}
    if skip:  # theirs [d_out, d_in] applied as x @ W_skip.T; ours [d_in, d_out] applied as x @ W_skip
        ours["W_skip"] = shape_of(t["W_skip"], (d_in, d_in), "W_skip", wpath).t()
    cfg = SAEConfig(arch="transcoder", d_in=d_in, d_sae=d_sae, k=min(_K, d_sae), hook="", dtype=dtype_name(t["W_enc"]),
                    apply_b_dec_to_input=False, skip=skip, transcoder_activation="jumprelu")
    notes = {"architecture": arch, "sae_lens_version": c.get("sae_lens_version") or c.get("sae_lens_training_version")}
    return Foreign(build(cfg, ours, wpath), "saelens", c.get("hook_name"), c.get("model_name"), [path, wpath], notes,
                   hook_out=c.get("hook_name_out"))


def sparsify_transcoder(raw: dict[str, Any], t: dict[str, torch.Tensor], path: Path,
                        wpath: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """The config of a sparsify ``transcode`` folder (``cfg.json`` ``raw`` at ``path``, tensors ``t``) and the tensors
    our transcoder holds beyond the SAE's encoder / decoder (which the caller maps)."""
    d_in, n = int(raw["d_in"]), int(t["encoder.weight"].shape[0])
    skip = bool(raw.get("skip_connection"))
    extra = {"threshold": torch.tensor(-1.0)}  # BatchTopK's buffer, unused by TopK: "not estimated"
    if skip:  # theirs [d_out, d_in] applied as x @ W_skip.mT; ours [d_in, d_out] applied as x @ W_skip
        need(t, ("W_skip",), wpath)
        extra["W_skip"] = shape_of(t["W_skip"], (d_in, d_in), "W_skip", wpath).t()
    elif "W_skip" in t:
        raise UserError(f"{wpath}: holds W_skip, but {path.name} says skip_connection false")
    cfg = SAEConfig(arch="transcoder", d_in=d_in, d_sae=n, k=int(raw["k"]), hook="",
                    dtype=dtype_name(t["encoder.weight"]), apply_b_dec_to_input=False, skip=skip,
                    transcoder_activation="topk")
    return cfg, extra
