"""A repository of the zoo models the benchmark smoke tests serve (exported once per worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.repo import export_zoo


@pytest.fixture(scope="session")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_repository")
    for name in ("seq_bn", "transformer_ln"):
        export_zoo(root, name)
    return root
