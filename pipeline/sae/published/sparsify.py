"""EleutherAI sparsify SAEs: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``.

Checked against the ``eai-sparsify`` package itself (``SparseCoder``), not against SAELens' loader for it
(which transposes W_dec and leaves out the b_dec subtraction): encoder.weight[num_latents, d_in] and
encoder.bias[num_latents] (an ``nn.Linear``), W_dec[num_latents, d_in] (rows are latents, as ours),
b_dec[d_in]; latents = TopK(ReLU(encoder(x - b_dec))) (the input is centred unless ``transcode``), decode
= latents @ W_dec + b_dec; ``transcode`` folders (a transcoder of the hookpoint module: its input -> its output,
``skip_connection`` adding ``x @ W_skip.mT``) are this pipeline's ``transcoder`` (:mod:`.transcoders`). The folder's
name is the hookpoint (a transformers module path such as ``layers.9`` or
``gpt_neox.layers.9.mlp``); the run's ``config.json`` one folder up names the model.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.sae.config import SAEConfig
from pipeline.sae.io import _read_json, _read_tensors
from pipeline.sae.published.common import Foreign, build, dtype_name, need, shape_of
from pipeline.sae.published.transcoders import sparsify_transcoder

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def read_sparsify(d: Path) -> Foreign:
    """Import a sparsify TopK SAE folder (eval mode, CPU); its encode/decode equal ``SparseCoder``'s."""
    path = d / CFG
    raw = _read_json(path)
    if raw.get("activation", "topk") != "topk":
        raise UserError(f"{path}: sparsify activation {raw.get('activation')!r} is not supported (topk only)")
    transcode = bool(raw.get("transcode"))
    if raw.get("skip_connection") and not transcode:
        raise UserError(f"{path}: sparsify skip_connection=true without transcode is not supported (an SAE with a "
                        "linear skip path has no equivalent here; transcoders do)")
    try:
        d_in, k = int(raw["d_in"]), int(raw["k"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: needs integer 'd_in' and 'k'") from None
    wpath = d / WEIGHTS
    t = _read_tensors(wpath)
    need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), wpath)
    n = int(t["encoder.weight"].shape[0])
    if raw.get("num_latents") and int(raw["num_latents"]) != n:
        raise UserError(f"{wpath}: encoder.weight has {n} latents, cfg.json says num_latents {raw['num_latents']}")
    W_enc = shape_of(t["encoder.weight"], (n, d_in), "encoder.weight", wpath).t()  # ours: [d_in, d_sae]
    ours = {"W_enc": W_enc, "b_enc": shape_of(t["encoder.bias"], (n,), "encoder.bias", wpath),
            "W_dec": shape_of(t["W_dec"], (n, d_in), "W_dec", wpath), "b_dec": shape_of(t["b_dec"], (d_in,), "b_dec", wpath)}
    if transcode:  # reads the hookpoint module's input, predicts its output
        cfg, extra = sparsify_transcoder(raw, t, path, wpath)
        ours |= extra
    else:
        cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=n, k=k, hook="", dtype=dtype_name(W_enc),
                        apply_b_dec_to_input=True)
    sae = build(cfg, ours, wpath)
    run_cfg = d.parent / "config.json"
    model = None
    if run_cfg.is_file():
        try:
            model = _read_json(run_cfg).get("model")
        except UserError:
            model = None
    files = [path, wpath] + ([run_cfg] if model else [])
    notes = {"multi_topk": bool(raw.get("multi_topk"))} | ({"transcode": True, "skip_connection": cfg.skip} if transcode
                                                           else {})
    return Foreign(sae, "sparsify", d.name, model, files, notes, hook_out=d.name if transcode else None)
