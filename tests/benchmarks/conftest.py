"""Fixtures of the benchmark smoke tests: a repository of the zoo models they serve (exported
once per worker), and torch's thread count given back after a benchmark pinned it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.serve.repo import export_zoo


@pytest.fixture(scope="session")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_repository")
    for name in ("seq_bn", "transformer_ln"):
        export_zoo(root, name)
    return root


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """``main`` pins torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
