"""Offline fixtures for tests and CPU benchmarks: tiny random transformers and a small text corpus.

Shipped inside the package (not under ``tests/``) so benchmarks and users' own tests can build
the same tiny models: random weights from a config, a BPE tokenizer trained on standard-library
text, ``save_pretrained`` to a folder. No network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TOPICS = ("music", "cooking", "astronomy")
_TOPIC_WORDS = {
    "music": "melody rhythm guitar violin chord concert symphony tempo harmony piano".split(),
    "cooking": "recipe flour butter oven garlic simmer sauce onion pepper bake".split(),
    "astronomy": "planet galaxy orbit telescope comet star nebula moon asteroid eclipse".split(),
}
_FILLER = "the a of and in to is was with for on by as it that this from at".split()


def stdlib_text(max_chars: int = 400_000) -> str:
    """English prose from the standard library (Python's own help topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


def labelled_documents(n: int = 120, seed: int = 0, words: int = 60) -> list[dict[str, str]]:
    """Generated documents with a topic label: topic words mixed with filler, deterministic by seed."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        toks = [rng.choice(_TOPIC_WORDS[topic]) if rng.random() < 0.4 else rng.choice(_FILLER) for _ in range(words)]
        docs.append({"title": f"{topic} {i}", "text": " ".join(toks).capitalize() + ".", "topic": topic})
    return docs


def write_jsonl(path: Path, docs: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def train_tokenizer(out_dir: Path, vocab_size: int = 512):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on stdlib text + the generated corpus' words (< 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [stdlib_text(100_000)] + [d["text"] for d in labelled_documents(60)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, n_layers: int = 3, d_model: int = 32) -> Path:
    """Save a tiny random causal LM of ``arch`` ('llama', 'gpt2', 'gpt_neox', 'gemma') with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir)
    vocab = len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=512, **ids)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                            num_attention_heads=4, max_position_embeddings=512, **ids)
    elif arch == "gemma":
        from transformers import GemmaConfig

        cfg = GemmaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512, **ids)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir)
    return out_dir


def default_params(**sections: Any) -> dict:
    """A complete params dict (every knob, as ``load_params`` and DVC want): the schema's defaults with
    ``sections`` merged on top, e.g. ``default_params(seed=1, train={"lr": 1e-3})``."""
    from pipeline.params import Params, to_dict

    params = to_dict(Params())
    for section, values in sections.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    return params


def tiny_params(model_dir: Path, corpus: Path, hooks: list[str] | None = None, **sections: dict) -> dict:
    """A complete params dict that runs the pipeline on a tiny model in seconds.

    Starts from the schema's defaults and overrides what makes it tiny; ``sections`` merge on top,
    e.g. ``tiny_params(m, c, train={"lr": 1e-3})``.
    """
    params = default_params(
        model={"name": str(model_dir), "dtype": "float32", "device": "cpu"},
        corpus={"source": str(corpus), "context_length": 32, "n_tokens": 32 * 40, "validation_fraction": 0.2},
        extract={"hooks": hooks or ["layers.1.resid_post"], "batch_size": 4, "contexts_per_shard": 8},
    )
    for section, values in sections.items():
        params[section].update(values)
    return params


def write_params(path: Path, params: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
