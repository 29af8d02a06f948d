"""Params of the data stages: the subject model, the corpus, token contexts, extraction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.core import ParamsError, knob

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelParams:
    name: str = knob("smollm2-135m", help="Subject model: 'smollm2-135m' (packaged, offline), a Hugging Face hub id, or a local model folder.")
    revision: str = knob("main", help="Hub revision (branch, tag or commit) for hub ids; ignored for local folders and the packaged model.")
    dtype: Dtype = knob("bfloat16", help="Compute dtype of the subject model's forward pass.")
    device: str = knob("auto", help="'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")


@dataclass
class CorpusParams:
    source: str = knob(
        "wiki-summaries",
        help="'wiki-summaries' (packaged, 12 topic labels), local .txt/.jsonl/.parquet files or globs "
        "(comma-separated), or 'hf:name[:config][@split]' for a Hugging Face dataset (streamed).",
    )
    text_column: str = knob("text", help="Column holding the text in .jsonl/.parquet/hf sources.")
    title_column: str = knob("title", help="Optional column with a document title (kept as metadata).")
    label_column: str = knob("topic", help="Optional column with a label (kept as metadata; ground truth for interpret/steer).")
    max_documents: int | None = knob(None, help="Read at most this many documents (null: all).", ge=1)
    context_length: int = knob(128, help="Tokens per context, BOS included.", ge=2, le=65536)
    bos: Literal["context", "document", "none"] = knob(
        "context",
        help="BOS policy: 'context' puts BOS at position 0 of every context; 'document' puts BOS before "
        "every document in the token stream; 'none' never adds BOS.",
    )
    n_tokens: int = knob(1048576, help="Token budget over both splits (context_length * number of contexts).", ge=2)
    validation_fraction: float = knob(0.1, help="Fraction of documents held out for validation (split by document).", ge=0.0, lt=1.0)


@dataclass
class ExtractParams:
    hooks: list[str] = knob(
        factory=lambda: ["layers.9.resid_post"],
        help="Hook points to record: layers.{i}.resid_post | layers.{i}.mlp_in | layers.{i}.mlp_out | layers.{i}.attn_out | embed (mlp_in + mlp_out: a transcoder's pair, one forward).",
    )
    batch_size: int | Literal["auto"] = knob(
        16, help="Contexts per forward pass, or 'auto': from free GPU memory (16 on CPU), a divisor of contexts_per_shard.", ge=1)
    dtype: Literal["float16", "float32"] = knob("float16", help="Storage dtype of activation vectors.")
    contexts_per_shard: int = knob(512, help="Contexts per Parquet shard (the unit of resume); a multiple of batch_size.", ge=1)
    processes: int | Literal["auto"] = knob(
        1, help="Processes `sae extract` starts on this machine (as torchrun --standalone --nproc-per-node N), each "
        "computing every N-th shard; the dataset is byte-identical to one process's. 1 = this process only, 'auto' = "
        "one per visible GPU (1 without CUDA or with model.device cpu). Ignored under torchrun.", ge=1)

    def check(self, prefix: str) -> None:
        if not self.hooks:
            raise ParamsError(f"{prefix}.hooks: [] is empty (name at least one hook, e.g. layers.9.resid_post)")
        if self.batch_size != "auto" and self.contexts_per_shard % self.batch_size:
            raise ParamsError(
                f"{prefix}.contexts_per_shard: {self.contexts_per_shard} is not a multiple of "
                f"{prefix}.batch_size ({self.batch_size}); shards must hold whole batches"
            )
