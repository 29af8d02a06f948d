"""Other tools' hook names -> this pipeline's (``layers.{i}.resid_post``, ``layers.{i}.mlp_out``, ...).

A published SAE names the activation it reads in its library's vocabulary: TransformerLens hook names
(SAELens: ``blocks.9.hook_resid_post``), transformers module paths (sparsify: ``layers.9``,
``model.layers.9.mlp``; Gemma Scope 2: ``model.layers.9.output``) or a dictionary_learning submodule name
(``resid_post_layer_9``). Only names whose activation is exactly the one this pipeline records under its
own name are mapped (see docs/hooks.md); anything else is ``None``, and the caller says so.
"""

from __future__ import annotations

import re

from pipeline.errors import UserError

_OURS = re.compile(r"^(embed|layers\.\d+\.(resid_post|mlp_in|mlp_out|attn_out))$")
_TL = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre|mlp_out|attn_out)$")
# transformers module paths: an optional model prefix, the decoder list, the block index, an optional child
_HF = re.compile(r"^(?:[A-Za-z_]+\.)*(?:layers|h|blocks|layer)\.(\d+)(?:\.(output|mlp|self_attn|attn|attention))?$")
_HF_KIND = {None: "resid_post", "output": "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
            "attention": "attn_out"}
_DL = re.compile(r"^(resid_post|mlp_out|attn_out)_layer_(\d+)$")
# A transcoder's input, the MLP's input after its norm: circuit-tracer's TransformerLens hook (fold_ln off, so the
# norm's weights are applied), or the output of the norm module in front of the MLP (GPT-2, Llama-like, Gemma 2/3).
_TL_IN = re.compile(r"^blocks\.(\d+)\.mlp\.hook_in$")
_HF_IN = re.compile(r"^(?:[A-Za-z_]+\.)*(?:layers|h|blocks|layer)\.(\d+)\."
                    r"(?:ln_2|post_attention_layernorm|pre_feedforward_layernorm)(?:\.output)?$")
# Names of an MLP input that are not this pipeline's, and why (said in the error).
_NOT_IN = {re.compile(r"^blocks\.\d+\.ln2\.hook_normalized$"):
           "TransformerLens' ln2.hook_normalized is the normalised vector before ln2's weight and bias (which "
           "TransformerLens folds into the MLP), not the MLP's input",
           re.compile(r"^blocks\.\d+\.hook_mlp_in$"): "TransformerLens' hook_mlp_in is the residual stream before "
           "the norm in front of the MLP, not the MLP's input"}


def map_hook(name: str | None) -> str | None:
    """This pipeline's name for a foreign hook ``name``, or None when there is no exact equivalent.

    ``blocks.{i}.hook_resid_pre`` is block i's input: ``embed`` for i = 0, else ``layers.{i-1}.resid_post``.
    """
    if not name:
        return None
    if _OURS.match(name):
        return name
    if m := _TL.match(name):
        i, kind = int(m.group(1)), m.group(2)
        if kind == "resid_pre":
            return "embed" if i == 0 else f"layers.{i - 1}.resid_post"
        return f"layers.{i}.{kind}"
    if m := _HF.match(name):
        return f"layers.{int(m.group(1))}.{_HF_KIND[m.group(2)]}"
    if m := _DL.match(name):
        return f"layers.{int(m.group(2))}.{m.group(1)}"
    return None


def map_pair(hook_in: str | None, hook_out: str | None) -> tuple[str | None, str | None]:
    """A transcoder's (input, output) hooks in this pipeline's names (``layers.{i}.mlp_in``, ``layers.{i}.mlp_out``),
    None where a name has no exact equivalent. One module path on both sides (sparsify's ``layers.9.mlp``) is a
    transcoder of that module: it reads the module's input and predicts its output."""
    out = map_hook(hook_out)
    if hook_in and hook_in == hook_out and out is not None and out.endswith(".mlp_out"):
        return out[: -len("mlp_out")] + "mlp_in", out
    ours_in = None
    if hook_in and re.match(r"^layers\.\d+\.mlp_in$", hook_in):
        ours_in = hook_in
    elif hook_in and (m := _TL_IN.match(hook_in) or _HF_IN.match(hook_in)):
        ours_in = f"layers.{int(m.group(1))}.mlp_in"
    return ours_in, out


def why_not_ours(name: str) -> str:
    """Why a known foreign MLP-input name is not this pipeline's ``mlp_in`` ("" when there is nothing to add)."""
    return next((why for pat, why in _NOT_IN.items() if pat.match(name)), "")


def check_gemma_site(hook: str, model: str | None, source: str) -> None:
    """Gemma 2/3 put a norm after attention and after the MLP, inside the residual branch. TransformerLens (and so
    SAELens and Gemma Scope) take ``hook_mlp_out`` / ``attn_out`` after that norm; this pipeline's
    ``layers.{i}.mlp_out`` / ``attn_out`` are the module outputs before it (docs/hooks.md). Not the same activation."""
    if model and re.search(r"gemma-?[23]", model.lower()) and hook.endswith(("mlp_out", "attn_out")):
        raise UserError(f"{source}: a {model} SAE on {hook} reads the activation after Gemma's post-norm, which this "
                        "pipeline's hook of that name is not (it is taken before the norm); residual-stream SAEs only")
