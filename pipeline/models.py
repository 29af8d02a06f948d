"""Resolve and load the subject model: the packaged SmolLM2, a local folder, or a Hugging Face hub id.

The packaged model's conversion and the weight hash live in :mod:`pipeline.model_files`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.devices import TORCH_DTYPES, resolve_device
from pipeline.errors import UserError
from pipeline.hooks import d_model as _d_model
from pipeline.hooks import n_layers as _n_layers
from pipeline.model_files import PACKAGED, packaged_model_dir, weights_hash
from pipeline.packaged import cache_dir

__all__ = ["PACKAGED", "LoadedModel", "load_model", "load_config", "load_tokenizer", "cache_dir", "weights_hash",
           "packaged_model_dir"]

log = logging.getLogger(__name__)

MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the model.dtype choices (float64 weights: no use here)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, requires_grad False
    tokenizer: Any  # transformers tokenizer
    model_id: str  # load_model(model_id, revision) loads these weights again
    revision: str | None  # resolved hub commit; None for the packaged model and local folders
    weights_hash: str  # see weights_hash()
    path: Path  # the local folder actually loaded
    n_layers: int
    d_model: int


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.startswith(os.sep) or name in (".", "..")


def _reason(e: Exception) -> str:
    """``'TypeName: first sentence of the message'``, short enough for a one-line error."""
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {first}"[:200]


def _not_found(name: str, reason: str) -> UserError:
    reason = " ".join(reason.split())
    return UserError(
        f"model.name: {name!r} is neither the packaged '{PACKAGED}', a local folder, "
        f"nor a model in the Hugging Face cache/hub ({reason})"
    )


def _resolve(name: str, revision: str) -> tuple[Path, str, str | None]:
    """(local folder, model_id, resolved revision) for any accepted ``name``."""
    folder = _local_folder(name)
    if folder is not None:
        return folder.resolve(), PACKAGED if name == PACKAGED else str(folder.resolve()), None
    from huggingface_hub import snapshot_download

    # Only what from_pretrained reads: configs, tokenizer files, weights (not ONNX/TF/Flax copies).
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
    try:
        path = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # older repos ship only pytorch_model*.bin
            path = Path(snapshot_download(name, revision=revision, allow_patterns=[*patterns, "*.bin"]))
    except Exception as e:  # not found, gated, offline without a cached copy, invalid id, network
        raise _not_found(name, _reason(e)) from None
    return path, name, path.name  # snapshot folders are named by commit


def _local_folder(name: str) -> Path | None:
    """The folder for the packaged model or a local path; None for a hub id."""
    if name == PACKAGED:
        return packaged_model_dir()
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.name: folder {name!r} has no config.json (not a Hugging Face model folder)")
        return local
    if _looks_like_path(name):
        raise _not_found(name, "no such folder")
    return None


def load_config(name: str, revision: str = "main") -> Any:
    """The model's ``PretrainedConfig`` without its weights (the packaged model is converted if needed)."""
    from transformers import AutoConfig

    folder = _local_folder(name)
    try:
        return AutoConfig.from_pretrained(folder if folder is not None else name, revision=revision)
    except Exception as e:
        raise _not_found(name, _reason(e)) from None


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched generation needs a pad id; it is masked anyway
    return tokenizer


def load_tokenizer(name: str, revision: str = "main") -> Any:
    """The model's tokenizer alone (same files :func:`load_model` reads; no weights downloaded)."""
    from transformers import AutoTokenizer

    folder = _local_folder(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder if folder is not None else name, revision=revision)
    except Exception as e:
        raise _not_found(name, _reason(e)) from None
    return _prepare_tokenizer(tok)


def load_model(name: str, revision: str = "main", dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load the subject model for inference: eval mode, no gradients, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in MODEL_DTYPES:
        raise UserError(f"model.dtype: {dtype!r} is not allowed (allowed: {', '.join(MODEL_DTYPES)})")
    dev = resolve_device(device, "model.device")
    path, model_id, resolved = _resolve(name, revision)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype])
    model.to(dev).eval().requires_grad_(False)  # type: ignore[arg-type]
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    log.info("loaded %s from %s in %.1fs (%s, %s)", model_id, path, time.perf_counter() - t0, dtype, dev)
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=model_id, revision=resolved, weights_hash=weights_hash(path),
        path=path, n_layers=_n_layers(model.config), d_model=_d_model(model.config),
    )
