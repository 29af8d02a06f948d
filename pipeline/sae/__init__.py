"""The SAE model zoo: one module per architecture, a shared base, and SAE files (native, SAELens, sparsify).

Adding an architecture is adding one module to this package: a subclass of :class:`SAE` decorated with
``@register("name")`` that overrides its encode (and, for a sparsity penalty or auxiliary loss,
``_loss_terms``). Every module of the package is imported here, so the new name is in ``ARCHS`` and
``sae.arch: name`` trains it; nothing else lists the architectures.

Public API::

    from pipeline.sae import SAEConfig, SAE, LossOutput, make_sae, ARCHS, config_from_params
    from pipeline.sae import save_sae, load_sae, export_saelens, import_saelens, export_sparsify, import_sparsify
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.sae.base import ARCHS, SAE, LossOutput, Term, make_sae, register
from pipeline.sae.config import SAEConfig, config_from_params
from pipeline.sae.dense import NoDictionaryError
from pipeline.sae.io import (
    export_saelens,
    export_sparsify,
    import_saelens,
    import_sparsify,
    load_sae,
    save_sae,
)

for _module in pkgutil.iter_modules(__path__):  # each architecture module registers itself (fills ARCHS)
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ARCHS", "SAE", "SAEConfig", "LossOutput", "Term", "NoDictionaryError", "make_sae", "register", "config_from_params",
    "save_sae", "load_sae", "export_saelens", "import_saelens", "export_sparsify", "import_sparsify",
]
