"""Where a dictionary reads and where it writes, and edits of a forward pass at that site.

An SAE encodes the hidden state of one hook and reconstructs the same hook: it reads and writes there. A transcoder
(:mod:`pipeline.sae.transcoder`) encodes block i's MLP input ``layers.{i}.mlp_in`` and predicts that block's MLP
output ``layers.{i}.mlp_out``: its latents are read from the MLP input, its decoder rows live in the MLP output (a
residual-stream direction). Everything that *writes* with a dictionary (steering by a decoder row, clamping a latent,
the difference-in-means and random-direction baselines, ablations, a spliced reconstruction) therefore edits the
write hook, and everything that *reads* latents (firing statistics, re-encoding a generation) encodes the read hook.
:func:`edit_site` runs an edit at the write hook that also sees the read hook's state of the same forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.hooks import intervene, parse_hook

__all__ = ["Site", "as_site", "site_of", "is_transcoder", "edit_site"]


@dataclass(frozen=True)
class Site:
    read: str  # the hook whose hidden state the dictionary encodes
    write: str  # the hook the dictionary's output (a decoder row, a reconstruction) belongs to

    @property
    def paired(self) -> bool:
        """True when reading and writing are two hooks (a transcoder)."""
        return self.read != self.write


def as_site(hook: str | Site) -> Site:
    """A hook name is an SAE's site (read and write at the hook)."""
    return hook if isinstance(hook, Site) else Site(hook, hook)


def is_transcoder(sae: Any) -> bool:
    return bool(getattr(sae, "is_transcoder", False))


def site_of(sae: Any, hook: str) -> Site:
    """The site of the dictionary trained at ``hook`` (a transcoder is keyed by its input hook ``layers.{i}.mlp_in``
    and writes the output hook its ``cfg.hook_out`` records, else ``layers.{i}.mlp_out``)."""
    if not is_transcoder(sae):
        return Site(hook, hook)
    out = str(getattr(sae.cfg, "hook_out", "") or "")
    if not out:
        hp = parse_hook(hook)
        if hp.kind != "mlp_in":
            raise UserError(f"hook {hook!r}: a transcoder reads layers.{{i}}.mlp_in, not {hp.kind}")
        out = f"layers.{hp.layer}.mlp_out"
    return Site(hook, out)


@contextmanager
def edit_site(model: nn.Module, site: str | Site, fn: Callable[..., Tensor]) -> Iterator[None]:
    """Within the block, the write hook's hidden state ``h [B, T, d]`` becomes ``fn(h)`` (one hook) or ``fn(h, x)``
    with ``x [B, T, d]`` the read hook's state of the same forward (two hooks; the read hook is left unchanged).

    The read hook fires before the write hook in every forward, prefill or one KV-cache generation step, so ``x``
    always has ``h``'s batch and positions.
    """
    site = as_site(site)
    if not site.paired:
        with intervene(model, site.write, fn):
            yield
        return
    seen: list[Tensor] = []

    def record(x: Tensor) -> None:  # None: record only, the MLP input is not edited
        seen.append(x)

    def write(h: Tensor) -> Tensor:
        return fn(h, seen.pop())

    with intervene(model, site.read, record), intervene(model, site.write, write):  # type: ignore[arg-type]
        yield
