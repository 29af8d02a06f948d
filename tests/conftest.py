"""Shared offline fixtures: tiny random models (saved once per session) and small corpora."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # tests set their own store explicitly

from pipeline.testing import labelled_documents, tiny_model, write_jsonl  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def labelled_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .jsonl corpus of 120 generated documents with 3 topic labels."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", labelled_documents(120))


@pytest.fixture()
def tiny_workspace(tmp_path: Path, tiny_llama: Path, labelled_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd with a tiny-model params.yaml: stage commands run against it with relative paths."""
    from pipeline.testing import tiny_params, write_params

    write_params(tmp_path / "params.yaml", tiny_params(tiny_llama, labelled_corpus))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test: on tiny matmuls thread hand-offs cost more than they save on a shared
    2-core box (~15x in tests/test_ground_truth.py)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def restore_numerics() -> Iterator[None]:
    """For a test that runs a stage with ``numerics.portable`` (``apply_numerics`` changes this process's torch
    state): put threads, deterministic algorithms and TF32 back afterwards, for the tests that follow."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    matmul, cublas = torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = cudnn
    torch.set_float32_matmul_precision(matmul)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
