"""Published SAEs in: SAELens, Gemma Scope 1 and 2, EleutherAI sparsify and dictionary_learning files, from a
local folder or the Hugging Face hub, as SAEs of this pipeline (``sae.source`` in params).

Each importer's encode / decode equal the source library's own (tests: ``tests/test_published.py``, with
fixtures written by the real packages where they install). Public API::

    from pipeline.sae.published import import_published, read_folder
    f = read_folder("path/to/sae")            # Foreign(sae, format, hook, model, files, notes); format auto-detected
    f.sae.encode(x)                            # x[..., d_in] -> [..., d_sae]
"""

from __future__ import annotations

from pathlib import Path

from pipeline.sae.published.common import Foreign
from pipeline.sae.published.source import (
    FORMATS,
    PROVENANCE,
    _reader,
    detect_format,
    import_published,
    resolve,
    source_versions,
)


def read_folder(folder: str | Path, fmt: str = "auto") -> Foreign:
    """Import the SAE in local ``folder`` (layout ``fmt``, or detected) without any check against params."""
    d = Path(folder)
    return _reader(detect_format(d) if fmt == "auto" else fmt)(d)


__all__ = ["FORMATS", "PROVENANCE", "Foreign", "detect_format", "import_published", "read_folder", "resolve",
           "source_versions"]
