"""Published SAE files from the Hugging Face hub: only the SAE's own files, cached, offline from the cache.

``snapshot_download`` with ``allow_patterns`` limited to the one SAE's folder (a Gemma Scope repository
holds hundreds of SAEs; one is a few hundred MB), into the standard hub cache (``HF_HUB_CACHE`` /
``HF_HOME``), so a second run and an offline run (``HF_HUB_OFFLINE=1``, or no network) read the cached
snapshot without a request. The snapshot's commit is part of the returned path and of the provenance.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)

#: every file an importer reads, at the SAE's folder level (the run config one level up: sparsify's model name)
SAE_FILES = ("cfg.json", "config.json", "sae_weights.safetensors", "sae.safetensors", "params.npz",
             "params.safetensors", "ae.pt")


def parse_ref(ref: str) -> tuple[str, str, str | None]:
    """``<owner>/<repo>[/<path in the repo>][@<revision>]`` -> (repo id, path ('' = root), revision)."""
    body, _, revision = ref.partition("@")
    parts = [p for p in body.strip("/").split("/") if p]
    if len(parts) < 2:
        raise UserError(f"sae.source: hf:{ref} needs <owner>/<repo>[/<path>][@<revision>]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def patterns(path: str) -> list[str]:
    """The files of the SAE at ``path`` (and its parent's ``config.json``), nothing else of the repository."""
    pre = f"{path}/" if path else ""
    parent = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    return [pre + f for f in SAE_FILES] + ([f"{parent}config.json"] if path else [])


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(repo_id: str, path: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the SAE at ``path`` in ``repo_id`` (downloaded into the hub cache unless there already).

    Offline (``HF_HUB_OFFLINE``), or when the hub cannot be reached, the cached snapshot is used; neither there:
    one line naming the reference.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    kw = dict(repo_id=repo_id, revision=revision, allow_patterns=patterns(path),
              cache_dir=str(cache_dir) if cache_dir else None)
    ref = f"hf:{repo_id}{'/' + path if path else ''}{'@' + revision if revision else ''}"
    try:
        root = snapshot_download(**kw, local_files_only=offline())
    except LocalEntryNotFoundError:
        raise UserError(f"sae.source: {ref} is not in the hub cache and the hub is not reachable"
                        f"{' (HF_HUB_OFFLINE is set)' if offline() else ''}; download it once online") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        if offline():
            raise UserError(f"sae.source: {ref}: {str(e).splitlines()[0][:200]}") from None
        log.warning("hub unreachable for %s (%s); trying the cache", ref, str(e).splitlines()[0][:120])
        try:
            root = snapshot_download(**kw, local_files_only=True)
        except LocalEntryNotFoundError:
            raise UserError(f"sae.source: {ref}: {str(e).splitlines()[0][:200]} (and not in the hub cache)") from None
    folder = Path(root) / path
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(f"sae.source: {ref}: no SAE files at '{path or '/'}' in {repo_id} "
                        f"(looked for {', '.join(SAE_FILES)})")
    return folder
