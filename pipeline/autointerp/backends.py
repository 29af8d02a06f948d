"""LM backends for explaining and scoring: a local transformers chat model, an OpenAI-compatible endpoint,
and a cache in front of either.

Both answer two calls: ``generate(messages) -> str`` (an explanation) and ``yes_prob(messages) ->
float`` (P(Yes) against P(No) for the next token, the scorers' confidence; Paulo et al. 2024 score
with these probabilities rather than with sampled answers). ``Cached`` keys each call by
(backend, model, prompt version, messages), so a rerun costs nothing and a failure keeps the calls
already made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import UserError
from pipeline.io import atomic_write_text

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]
YES, NO = ("yes",), ("no",)


class Backend(Protocol):
    name: str

    def generate(self, messages: Messages, max_new_tokens: int) -> str: ...

    def yes_prob(self, messages: Messages) -> float: ...

    def yes_probs(self, batch: list[Messages]) -> list[float]: ...


class LocalChat:
    """A transformers causal LM loaded with ``pipeline.models.load_model`` (greedy, CPU/GPU)."""

    def __init__(self, model_name: str, device: str = "cpu", key: str = "interpret.explainer") -> None:
        from pipeline.models import load_model

        self.name = f"local:{model_name}"
        self.lm = load_model(model_name, dtype="float32", device=device)
        tok = self.lm.tokenizer
        vocab = tok.get_vocab()

        def first_ids(words: tuple[str, ...]) -> list[int]:
            ids = set()
            for w in words:
                for v in (w, w.capitalize(), " " + w, " " + w.capitalize()):
                    enc = tok.encode(v, add_special_tokens=False)
                    if enc:
                        ids.add(enc[0])
            return sorted(ids)

        y, n = set(first_ids(YES)), set(first_ids(NO))
        self.yes_ids, self.no_ids = sorted(y - n), sorted(n - y)  # a shared first piece (" ") tells nothing
        if not self.yes_ids or not self.no_ids:
            raise UserError(f"{key}: {model_name}'s tokenizer cannot tell 'Yes' from 'No' ({len(vocab)} tokens)")

    def _prompt(self, messages: Messages) -> str:
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"

    def _ids(self, messages: Messages) -> Any:
        import torch

        enc = self.lm.tokenizer(self._prompt(messages), return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"].to(self.lm.model.device), torch.ones_like(enc["input_ids"]).to(self.lm.model.device)

    def generate(self, messages: Messages, max_new_tokens: int) -> str:
        import torch

        ids, mask = self._ids(messages)
        with torch.no_grad():
            out = self.lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         do_sample=False, pad_token_id=self.lm.tokenizer.pad_token_id)
        text = self.lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return " ".join(text.split())

    def yes_prob(self, messages: Messages) -> float:
        return self.yes_probs([messages])[0]

    def yes_probs(self, batch: list[Messages], size: int = 8) -> list[float]:
        """P(Yes) for each prompt: left-padded batches, so the last position is every row's next token."""
        import torch

        tok, out = self.lm.tokenizer, []
        side, tok.padding_side = tok.padding_side, "left"
        try:
            for s in range(0, len(batch), size):
                enc = tok([self._prompt(m) for m in batch[s: s + size]], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(self.lm.model.device)
                pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # positions as if unpadded
                with torch.no_grad():
                    logits = self.lm.model(**enc, position_ids=pos).logits[:, -1].float()  # [b, vocab]
                y = torch.logsumexp(logits[:, self.yes_ids], 1)
                n = torch.logsumexp(logits[:, self.no_ids], 1)
                out += torch.sigmoid(y - n).tolist()
        finally:
            tok.padding_side = side
        return out


class OpenAIChat:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, hosted APIs), via urllib."""

    def __init__(self, model: str, base_url: str, api_key: str | None, max_retries: int = 5, timeout: float = 60.0,
                 backoff: float = 1.0) -> None:
        self.name, self.model, self.url = f"openai:{model}", model, base_url.rstrip("/") + "/chat/completions"
        self.api_key, self.max_retries, self.timeout, self.backoff = api_key, max_retries, timeout, backoff

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))  # exponential backoff
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode())
            except urllib.error.HTTPError as e:
                reason = f"HTTP {e.code}"
                if e.code in (401, 403):
                    raise UserError(f"llm.base_url: {self.url} refused the API key ({reason}); "
                                    "check llm.api_key_env") from None
                if e.code not in (408, 409, 429) and e.code < 500:
                    raise UserError(f"llm.base_url: {self.url} rejected the request ({reason})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                reason = type(e).__name__ + (f": {e.reason}" if isinstance(e, urllib.error.URLError) else "")
            log.warning("endpoint %s: %s (attempt %d/%d)", self.url, reason, attempt + 1, self.max_retries + 1)
        raise UserError(f"llm.base_url: {self.url} failed after {self.max_retries + 1} attempts ({reason}); "
                        "completed features are cached, rerun to resume")

    def generate(self, messages: Messages, max_new_tokens: int) -> str:
        r = self._post({"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0})
        return " ".join(str(r["choices"][0]["message"]["content"]).split())

    def yes_prob(self, messages: Messages) -> float:
        r = self._post({"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0,
                        "logprobs": True, "top_logprobs": 10})
        choice = r["choices"][0]
        py = pn = 0.0
        for item in ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs", []):
            word = str(item.get("token", "")).strip().lower()
            if word in YES:
                py += math.exp(item["logprob"])
            elif word in NO:
                pn += math.exp(item["logprob"])
        if py + pn > 0:
            return py / (py + pn)
        answer = str(choice["message"]["content"]).strip().lower()  # no logprobs: the answer itself
        return 1.0 if answer.startswith("yes") else 0.0

    def yes_probs(self, batch: list[Messages]) -> list[float]:
        return [self.yes_prob(m) for m in batch]


class Cached:
    """Memoise a backend's calls in a JSONL file (rewritten atomically by :meth:`flush`)."""

    def __init__(self, backend: Backend, path: Path, version: str) -> None:
        self.backend, self.path, self.version, self.name = backend, Path(path), version, backend.name
        self.data: dict[str, Any] = {}
        self.misses = 0
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["value"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a damaged line costs one recomputation, never the run

    def _key(self, call: str, messages: Messages, extra: Any = None) -> str:
        blob = json.dumps([self.backend.name, self.version, call, messages, extra], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _get(self, key: str, fn: Any) -> Any:
        if key not in self.data:
            self.misses += 1
            self.data[key] = fn()
        return self.data[key]

    def generate(self, messages: Messages, max_new_tokens: int) -> str:
        return self._get(self._key("generate", messages, max_new_tokens), lambda: self.backend.generate(messages, max_new_tokens))

    def yes_prob(self, messages: Messages) -> float:
        return self._get(self._key("yes_prob", messages), lambda: self.backend.yes_prob(messages))

    def yes_probs(self, batch: list[Messages]) -> list[float]:
        keys = [self._key("yes_prob", m) for m in batch]
        todo = [i for i, k in enumerate(keys) if k not in self.data]
        if todo:
            self.misses += len(todo)
            for i, v in zip(todo, self.backend.yes_probs([batch[i] for i in todo]), strict=True):
                self.data[keys[i]] = v
        return [self.data[k] for k in keys]

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in self.data.items()))
