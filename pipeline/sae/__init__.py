"""The SAE model zoo: one module per architecture, a shared base, and SAE files (native, SAELens, sparsify).

Public API::

    from pipeline.sae import SAEConfig, SAE, LossOutput, make_sae, ARCHS, config_from_params
    from pipeline.sae import save_sae, load_sae, export_saelens, import_saelens, export_sparsify, import_sparsify
"""

from __future__ import annotations

from pipeline.sae import dense, gated, jumprelu, kl, relu_l1, topk  # noqa: F401  (fill ARCHS)
from pipeline.sae.base import ARCHS, SAE, LossOutput, make_sae
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

__all__ = [
    "ARCHS", "SAE", "SAEConfig", "LossOutput", "NoDictionaryError", "make_sae", "config_from_params",
    "save_sae", "load_sae", "export_saelens", "import_saelens", "export_sparsify", "import_sparsify",
]
