"""One repository, one app and one real uvicorn server on 127.0.0.1 for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from normport.runtime.serve import create_app
from normport.runtime.serve.server import BackgroundServer
from tests.serve.repo import build_repository, reference_run


@pytest.fixture(scope="session")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("serve_repository"))


@pytest.fixture(scope="session")
def server(repo_root: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(repo_root, threads=1)) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: BackgroundServer) -> Iterator[triton.InferenceServerClient]:
    """tritonclient's sync client (gevent; one per thread, and tests run in one thread)."""
    c = triton.InferenceServerClient(server.url, connection_timeout=30, network_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    """A plain HTTP client, for what tritonclient cannot send (malformed requests)."""
    with httpx.Client(base_url=f"http://{server.url}", timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def reference(repo_root: Path):
    """``reference(model, feeds, version="1")``: a direct onnxruntime run, outputs by name."""

    def run(model: str, feeds: dict[str, np.ndarray], version: str = "1") -> dict[str, np.ndarray]:
        return reference_run(repo_root / model / version / "model.onnx", feeds)

    return run
