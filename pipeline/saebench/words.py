"""The first-letter task's words and prompts, and the model's activation at each prompt's word token.

SAEBench builds its vocabulary from the tokenizer's alphabetic tokens and reads the activation at a
fixed offset from the end of the prompt (-6, right for its tokenizers' " has the first letter:").
Here the word's last token is located for the tokenizer in use from the character offsets, so any
tokenizer works.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.hooks import run_to_hooks

TEMPLATE = "{word} has the first letter:"
N_ICL = 10  # in-context examples per prompt (SAEBench's max_icl_examples)
SEPARATOR = "\n"
_ALPHA = set(string.ascii_letters)


def alpha_words(tokenizer) -> list[str]:
    """The tokenizer's alphabetic tokens as text, one leading space stripped, deduplicated, sorted."""
    words: set[str] = set()
    for tok in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([tok])
        if text.startswith(" "):
            text = text[1:]
        if text and all(ch in _ALPHA for ch in text):
            words.add(text)
    return sorted(words)


def split_words(words: Sequence[str], n: int | None, seed: int, train_fraction: float = 0.8) -> tuple[list[str], list[str]]:
    """Up to ``n`` words drawn by ``seed`` (all when None), split 80/20 into train and test."""
    rng = random.Random(seed)
    pool = list(words)
    rng.shuffle(pool)
    if n is not None:
        pool = pool[:n]
    cut = int(len(pool) * train_fraction)
    return pool[:cut], pool[cut:]


@dataclass
class Prompt:
    text: str
    word_end: int  # character offset just past the word in ``text``
    letter: int  # index of the word's first letter in a..z


def make_prompts(words: Sequence[str], examples: Sequence[str], seed: int) -> list[Prompt]:
    """One prompt per word: ``N_ICL`` other words of the same split answered, then the word's question.
    Like SAEBench, the separator also precedes the first example."""
    rng = random.Random(seed)
    prefix, _ = TEMPLATE.split("{word}")
    out: list[Prompt] = []
    for w in words:
        pool = [e for e in rng.sample(list(examples), min(len(examples), N_ICL + 1)) if e != w][:N_ICL]
        shots = [TEMPLATE.format(word=e) + " " + e[0].upper() for e in pool]
        head = SEPARATOR + SEPARATOR.join(shots) + SEPARATOR
        text = head + TEMPLATE.format(word=w)
        out.append(Prompt(text, len(head) + len(prefix) + len(w), string.ascii_lowercase.index(w[0].lower())))
    return out


def word_positions(tokenizer, prompts: Sequence[Prompt], add_bos: bool) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt (BOS first when ``add_bos``) and the index of the token holding the word's
    last character."""
    enc = tokenizer([p.text for p in prompts], add_special_tokens=False, return_offsets_mapping=True)
    shift = 1 if add_bos else 0
    ids, pos = [], []
    for p, toks, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"], strict=True):
        last = p.word_end - 1
        idx = next(i for i, (a, b) in enumerate(offsets) if a <= last < b)
        ids.append(([tokenizer.bos_token_id] if add_bos else []) + list(toks))
        pos.append(idx + shift)
    return ids, pos


@torch.no_grad()
def word_activations(model: torch.nn.Module, hook: str, ids: list[list[int]], positions: list[int],
                     batch_size: int, pad_id: int, device: str | torch.device = "cpu") -> np.ndarray:
    """``[n, d_model]`` float32: the hook's activation at each prompt's word token (right-padded batches,
    so the positions before the pad are unaffected)."""
    rows: list[np.ndarray] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        T = max(len(c) for c in chunk)
        input_ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, c in enumerate(chunk):
            input_ids[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = 1
        h = run_to_hooks(model, input_ids.to(device), [hook], attention_mask=mask.to(device))[hook]  # [b, T, d]
        pos = torch.tensor(positions[start:start + batch_size], device=h.device)
        rows.append(h[torch.arange(len(chunk), device=h.device), pos].float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


__all__ = ["TEMPLATE", "N_ICL", "alpha_words", "split_words", "Prompt", "make_prompts", "word_positions",
           "word_activations"]
