"""Transcoder files for SAELens and EleutherAI sparsify (``export_saelens`` / ``export_sparsify`` delegate here).

SAELens: its ``transcoder`` / ``skip_transcoder`` classes are ReLU encoders and its ``jumprelu_transcoder`` /
``jumprelu_skip_transcoder`` JumpReLU ones; a ``batchtopk`` transcoder is exactly the latter with its inference
threshold on every latent, a ``jumprelu`` one (an import) with its own thresholds (a ``topk`` one has no SAELens
equivalent). ``cfg.json`` carries ``d_out`` and ``apply_b_dec_to_input: false``; the metadata ``hook_name`` (the
MLP input) and ``hook_name_out`` (the MLP output). Tensors W_enc[d_in, d_sae], b_enc, W_dec[d_sae, d_out], b_dec[d_out], threshold[d_sae], W_skip[d_out, d_in].

sparsify: ``transcode: true`` (no b_dec subtracted from the input), ``skip_connection`` with W_skip[d_out, d_in]
applied as ``x @ W_skip.mT``; TopK only, so a ``topk`` transcoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.io import atomic_write_json
from pipeline.sae.base import SAE


def hook_out(hook: str) -> str:
    """The MLP-output hook paired with an MLP-input hook (``layers.9.mlp_in`` -> ``layers.9.mlp_out``)."""
    return hook[: -len("mlp_in")] + "mlp_out" if hook.endswith("mlp_in") else hook


def saelens_files(s: SAE, model_name: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, cfg.json) of a folded transcoder ``s`` in SAELens layout."""
    c = s.cfg
    if c.transcoder_activation == "topk":
        raise UserError("export_saelens: SAELens has no TopK transcoder; train with "
                        "sae.transcoder_activation=batchtopk (exported as its JumpReLU transcoder)")
    sd = s.state_dict()
    t = {n: sd[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    t["threshold"] = sd["threshold"].clamp_min(0.0).expand(c.d_sae).to(s.dtype)  # batchtopk's one, or jumprelu's
    if c.skip:
        t["W_skip"] = sd["W_skip"].t()
    meta = {"hook_name": c.hook, "hook_name_out": getattr(c, "hook_out", "") or hook_out(c.hook), "model_name": model_name,
            "sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0"}
    cfg = {"architecture": "jumprelu_skip_transcoder" if c.skip else "jumprelu_transcoder", "d_in": c.d_in,
           "d_sae": c.d_sae, "d_out": c.d_in, "dtype": c.dtype, "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": meta}
    return t, cfg


def write_sparsify(s: SAE, d: Path, write_tensors: Any) -> None:
    """A folded ``topk`` transcoder ``s`` as a sparsify directory ``d``."""
    c = s.cfg
    if c.transcoder_activation != "topk":
        raise UserError("export_sparsify: sparsify transcoders are TopK; train with sae.transcoder_activation=topk")
    t = {"encoder.weight": s.W_enc.t(), "encoder.bias": s.b_enc, "W_dec": s.W_dec, "b_dec": s.b_dec}
    if c.skip:
        t["W_skip"] = s.W_skip.t()
    write_tensors(d / "sae.safetensors", t)
    atomic_write_json(d / "cfg.json", {
        "d_in": c.d_in, "num_latents": c.d_sae, "k": c.k, "activation": "topk",
        "expansion_factor": max(1, math.ceil(c.d_sae / c.d_in)), "normalize_decoder": False,
        "multi_topk": False, "skip_connection": bool(c.skip), "transcode": True,
    })
