"""Uniform hook names over transformers decoder-only models, resolved to real ``nn.Module``s.

Names (one vocabulary for every architecture; the table per architecture is in docs/hooks.md):

- ``embed``: the residual stream entering decoder block 0 (token + position embeddings, after
  dropout; for Gemma *after* the sqrt(d_model) scaling), recorded as block 0's input.
- ``layers.{i}.attn_out``: output[0] of block i's attention module (before it is added back).
- ``layers.{i}.mlp_in``: input of block i's MLP module (after its norm): what a transcoder reads.
- ``layers.{i}.mlp_out``: output of block i's MLP module (before it is added back).
- ``layers.{i}.resid_post``: output of decoder block i (the residual stream after block i).

Everything here is found generically (the decoder ``ModuleList`` and the usual attribute names),
so Llama/SmolLM, Gemma, GPT-2 and GPT-NeoX/Pythia work, and so do most look-alikes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.params.core import ParamsError

__all__ = [
    "HookPoint", "parse_hook", "validate_hooks", "hook_module", "run_to_hooks", "intervene",
    "final_norm_and_unembed", "n_layers", "d_model", "decoder_layers",
]

HookKind = Literal["resid_post", "mlp_in", "mlp_out", "attn_out", "embed"]
ALLOWED_FORMS = "layers.{i}.resid_post | layers.{i}.mlp_in | layers.{i}.mlp_out | layers.{i}.attn_out | embed"
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(resid_post|mlp_in|mlp_out|attn_out)$")
# Attribute names seen in transformers' decoder-only models, most common first.
_LAYER_LISTS = ("layers", "h", "blocks", "layer")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


@dataclass(frozen=True)
class HookPoint:
    name: str
    kind: HookKind
    layer: int | None  # None for ``embed``


def parse_hook(name: str) -> HookPoint:
    """``'layers.9.resid_post'`` -> ``HookPoint(name, 'resid_post', 9)``; UserError on anything else."""
    if name == "embed":
        return HookPoint(name, "embed", None)
    m = _LAYER_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise UserError(f"hook {name!r} is not a hook name (allowed: {ALLOWED_FORMS})")
    return HookPoint(name, m.group(2), int(m.group(1)))  # type: ignore[arg-type]


def _text_config(config: Any) -> Any:
    # Multimodal configs (e.g. Gemma 3) keep the language model's sizes in a text sub-config.
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def n_layers(config: Any) -> int:
    """Number of decoder blocks (GPT-2's ``n_layer`` is aliased to this name by transformers)."""
    return int(_text_config(config).num_hidden_layers)


def d_model(config: Any) -> int:
    """Width of the residual stream."""
    return int(_text_config(config).hidden_size)


def validate_hooks(hooks: list[str], config: Any, key: str = "extract.hooks") -> None:
    """Raise a one-line :class:`ParamsError` naming ``key`` for an unknown hook or a layer past the depth."""
    depth = n_layers(config)
    for h in hooks:
        try:
            hp = parse_hook(h)
        except UserError:
            raise ParamsError(f"{key}: {h!r} is not a hook name (allowed: {ALLOWED_FORMS})") from None
        if hp.layer is not None and hp.layer >= depth:
            raise ParamsError(f"{key}: {h!r} is beyond the model's depth (layers 0..{depth - 1})")


# --------------------------------------------------------------------------- module resolution


def _first_attr(obj: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        child = getattr(obj, n, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _base(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model``, ``transformer``, ``gpt_neox``)."""
    base = getattr(model, "base_model", model)
    # Multimodal wrappers hold the text decoder one level further down.
    inner = getattr(base, "language_model", None)
    return inner if isinstance(inner, nn.Module) else base


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder blocks, by name, else the longest ``ModuleList`` in the base."""
    base = _base(model)
    found = _first_attr(base, _LAYER_LISTS)
    if isinstance(found, nn.ModuleList):
        return found
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"model {type(model).__name__}: no decoder block list found; hooks are unsupported")
    return max(lists, key=len)


def _embed_module(model: nn.Module) -> nn.Module:
    base = _base(model)
    # GPT-2 sums wte + wpe and applies ``drop``; NeoX applies ``emb_dropout`` to ``embed_in``.
    found = _first_attr(base, ("drop", "emb_dropout", "embed_dropout"))
    return found if found is not None else model.get_input_embeddings()  # type: ignore[operator]


def hook_module(model: nn.Module, name: str) -> nn.Module:
    """The module whose output is the hook's activation (for ``mlp_in``: the MLP, whose *input* it is).

    For ``embed`` this is the embedding (or embedding-dropout) module; Gemma scales its output by
    sqrt(d_model) afterwards, so :func:`run_to_hooks` and :func:`intervene` use block 0's *input*
    instead, which is exactly ``embed`` for every architecture.
    """
    hp = parse_hook(name)
    if hp.kind == "embed":
        return _embed_module(model)
    layers = decoder_layers(model)
    if hp.layer >= len(layers):  # type: ignore[operator]
        raise UserError(f"hook {name!r}: the model has {len(layers)} layers (0..{len(layers) - 1})")
    block = layers[hp.layer]  # type: ignore[index]
    if hp.kind == "resid_post":
        return block
    names = _ATTN_NAMES if hp.kind == "attn_out" else _MLP_NAMES
    found = _first_attr(block, names)
    if found is None:
        raise UserError(f"hook {name!r}: block {type(block).__name__} has none of {names}")
    return found


# --------------------------------------------------------------------------- recording / editing


class _StopForward(Exception):
    """Raised from the last hook needed so blocks after it never run."""


def _first(out: Any) -> Tensor:
    # Attention modules return (hidden, weights); older blocks return (hidden, cache, ...).
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _register(model: nn.Module, name: str, fn: Callable[[Tensor], Tensor | None]) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(h)`` on the hook's hidden state ``h [B, T, d]``; if it returns a tensor, use it instead."""
    kind = parse_hook(name).kind
    if kind == "mlp_in":  # the MLP's first argument (the normed residual stream), by a forward pre-hook
        def mlp_pre(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = next(iter(kwargs))
            new = fn(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})

        return hook_module(model, name).register_forward_pre_hook(mlp_pre, with_kwargs=True)
    if kind == "embed":
        block0 = decoder_layers(model)[0]

        def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return block0.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_mod: nn.Module, _args: tuple, out: Any) -> Any:
        new = fn(_first(out))
        return None if new is None else _replace_first(out, new)

    return hook_module(model, name).register_forward_hook(post)


def run_to_hooks(
    model: nn.Module, input_ids: Tensor, hooks: list[str], attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """One forward pass that records every hook and stops as soon as the last of them has fired.

    :param input_ids: token ids (shape: [B, T])
    :param attention_mask: optional padding mask (shape: [B, T])
    :return: ``{hook: activation [B, T, d_model]}``, detached, in the model's dtype and device.
    """
    wanted = list(dict.fromkeys(hooks))
    for h in wanted:
        parse_hook(h)
    if not wanted:
        return {}
    acts: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable[[Tensor], None]:
        def rec(h: Tensor) -> None:
            acts[name] = h.detach()
            # Stopping here skips the remaining blocks and the LM head (the [B, T, vocab] logits
            # are the most expensive tensor of a small model's forward).
            if len(acts) == len(wanted):
                raise _StopForward
        return rec

    handles = [_register(model, h, recorder(h)) for h in wanted]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [h for h in wanted if h not in acts]
    if missing:
        raise RuntimeError(f"hooks {missing} never fired during the forward pass")
    return {h: acts[h] for h in hooks}


@contextmanager
def intervene(model: nn.Module, hook: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the hook's hidden state ``h [B, T, d]`` is replaced by ``fn(h)`` on every forward.

    Tuple outputs keep their other elements. Contexts nest: edits of the same hook apply in the
    order their contexts were entered. The hook is removed on exit, exceptions included.
    """
    handle = _register(model, hook, fn)
    try:
        yield
    finally:
        handle.remove()


def final_norm_and_unembed(model: nn.Module) -> tuple[nn.Module, Tensor]:
    """The final norm applied to the last residual stream and the unembedding ``W_U [vocab, d_model]``.

    ``logits ≈ norm(resid) @ W_U.T`` (the logit lens, nostalgebraist 2020). Gemma 2/3 additionally
    soft-cap the logits (``config.final_logit_softcapping``), which the lens leaves out.
    """
    norm = _first_attr(_base(model), _FINAL_NORMS)
    if norm is None:
        raise UserError(f"model {type(model).__name__}: no final norm among {_FINAL_NORMS}")
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise UserError(f"model {type(model).__name__}: no output embedding (LM head)")
    return norm, head.weight  # [vocab, d_model]
