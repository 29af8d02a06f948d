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

_OURS = re.compile(r"^(embed|layers\.\d+\.(resid_post|mlp_out|attn_out))$")
_TL = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre|mlp_out|attn_out)$")
# transformers module paths: an optional model prefix, the decoder list, the block index, an optional child
_HF = re.compile(r"^(?:[A-Za-z_]+\.)*(?:layers|h|blocks|layer)\.(\d+)(?:\.(output|mlp|self_attn|attn|attention))?$")
_HF_KIND = {None: "resid_post", "output": "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
            "attention": "attn_out"}
_DL = re.compile(r"^(resid_post|mlp_out|attn_out)_layer_(\d+)$")


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


def check_gemma_site(hook: str, model: str | None, source: str) -> None:
    """Gemma 2/3 put a norm after attention and after the MLP, inside the residual branch. TransformerLens (and so
    SAELens and Gemma Scope) take ``hook_mlp_out`` / ``attn_out`` after that norm; this pipeline's
    ``layers.{i}.mlp_out`` / ``attn_out`` are the module outputs before it (docs/hooks.md). Not the same activation."""
    if model and re.search(r"gemma-?[23]", model.lower()) and hook.endswith(("mlp_out", "attn_out")):
        raise UserError(f"{source}: a {model} SAE on {hook} reads the activation after Gemma's post-norm, which this "
                        "pipeline's hook of that name is not (it is taken before the norm); residual-stream SAEs only")
