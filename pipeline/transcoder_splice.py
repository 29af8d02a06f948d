"""Downstream metrics of a transcoder: the subject model's next-token loss with a block's MLP replaced by it.

The transcoder reads ``layers.{i}.mlp_in`` and stands in for ``layers.{i}.mlp_out``: in the spliced forward the MLP
output is replaced by ``transcoder.predict(mlp_in)`` of the same forward (the MLP input is recorded by a pre-hook
just before the MLP runs, and the MLP's own output is discarded), the ablation baseline zeroes the MLP's output,
and :func:`pipeline.splice.splice_metrics` does the rest (CE loss recovered, KL, the special-token policy), so the
numbers carry the same definitions and names as an SAE's at ``mlp_out``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.hooks import intervene, parse_hook
from pipeline.progress import Progress
from pipeline.splice import splice_metrics

Predict = Callable[[Tensor], Tensor]  # MLP input [..., d_model] -> predicted MLP output [..., d_model]


@torch.no_grad()
def mlp_replaced_metrics(model: nn.Module, hook_in: str, predict: Predict, contexts: Tensor, batch_size: int,
                         special_ids: Collection[int] = (), progress: Progress | None = None) -> dict[str, float]:
    """:func:`pipeline.splice.splice_metrics` with ``layers.{i}.mlp_out`` replaced by ``predict(mlp_in)``.

    ``hook_in`` is ``layers.{i}.mlp_in``; ``predict`` e.g. a transcoder's ``predict`` (float32 in and out);
    ``contexts [N, T]`` int64 token ids on the model's device.
    """
    hp = parse_hook(hook_in)
    if hp.kind != "mlp_in":
        raise UserError(f"hook {hook_in!r}: a transcoder replaces an MLP and reads layers.{{i}}.mlp_in")
    seen: dict[str, Tensor] = {}

    def record(h: Tensor) -> None:  # [b, T, d_model]: the MLP input of the forward now running
        seen["x"] = h

    def replace(_mlp_out: Tensor) -> Tensor:  # float32 [b, T, d_model]; the MLP's own output is dropped
        return predict(seen["x"].float())

    with intervene(model, hook_in, record):  # type: ignore[arg-type]  (None: record only, no edit)
        return splice_metrics(model, f"layers.{hp.layer}.mlp_out", replace, contexts, batch_size, special_ids,
                              progress)


__all__ = ["mlp_replaced_metrics"]
