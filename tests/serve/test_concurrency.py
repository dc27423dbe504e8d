"""64 concurrent tritonclient.aio clients against the real server: every response is its own
input's direct onnxruntime result (bit for bit), no errors, and the statistics prove that
requests were batched; with onnxruntime's runs taken by a worker thread per model, and in
loop mode (the event loop takes them, as where the process has one CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio

from normport.runtime.serve import batcher, create_app
from normport.runtime.serve.server import BackgroundServer

CLIENTS = 64
PER_CLIENT = 3
DEADLINE_S = 90


def workload(i: int, k: int) -> tuple[str, str, str, np.ndarray]:
    """Client ``i``'s ``k``-th request: a mix of models, batch sizes and non-batch shapes."""
    rng = np.random.default_rng(1000 * i + k)
    batch = 1 + (i + k) % 2
    if i % 2 == 0:
        size = 32 if i % 4 == 0 else 16  # two image sizes: two batching groups
        return (
            "cnn_bn",
            "image",
            "FP32",
            rng.standard_normal((batch, 3, size, size)).astype(np.float32),
        )
    length = 8 if i % 4 == 1 else 12
    return "transformer_ln", "tokens", "INT64", rng.integers(0, 64, (batch, length))


def stats(client, model: str) -> tuple[int, int]:
    s = client.get_inference_statistics(model)["model_stats"][0]
    return s["inference_count"], s["execution_count"]


@pytest.fixture(scope="module")
def loop_mode_server(repo_root: Path) -> Iterator[BackgroundServer]:
    """A server whose batchers run in loop mode: the process is made to look like one CPU."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batcher, "one_cpu", lambda: True)
        with BackgroundServer(create_app(repo_root, threads=1)) as running:
            yield running


def test_64_concurrent_clients(server, client, reference) -> None:
    run_clients(server, client, reference)


def test_64_concurrent_clients_in_loop_mode(loop_mode_server, reference) -> None:
    c = triton.InferenceServerClient(loop_mode_server.url, network_timeout=30)
    try:
        run_clients(loop_mode_server, c, reference)
    finally:
        c.close()


def run_clients(server, client, reference) -> None:
    plan = {(i, k): workload(i, k) for i in range(CLIENTS) for k in range(PER_CLIENT)}
    expected = {key: reference(m, {name: x}) for key, (m, name, _, x) in plan.items()}
    before = {m: stats(client, m) for m in ("cnn_bn", "transformer_ln")}

    async def one_client(i: int) -> list[tuple[tuple[int, int], dict[str, np.ndarray]]]:
        got = []
        async with triton_aio.InferenceServerClient(server.url, conn_timeout=60) as c:
            for k in range(PER_CLIENT):
                model, name, datatype, x = plan[(i, k)]
                tensor = triton_aio.InferInput(name, list(x.shape), datatype)
                tensor.set_data_from_numpy(x)
                result = await c.infer(model, [tensor], request_id=f"{i}-{k}")
                assert result.get_response()["id"] == f"{i}-{k}"
                got.append(((i, k), {"logits": result.as_numpy("logits")}))
        return got

    async def everyone():
        return await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))

    results = [
        r
        for per_client in asyncio.run(asyncio.wait_for(everyone(), DEADLINE_S))
        for r in per_client
    ]
    assert len(results) == CLIENTS * PER_CLIENT  # gather raised on any error
    for key, outputs in results:
        want = expected[key]["logits"]
        assert outputs["logits"].shape == want.shape
        assert np.array_equal(outputs["logits"], want), f"request {key} got another's result"

    for model in ("cnn_bn", "transformer_ln"):
        samples = sum(len(x) for m, _, _, x in plan.values() if m == model)
        inferences, executions = (
            a - b for a, b in zip(stats(client, model), before[model], strict=True)
        )
        assert inferences == samples
        assert executions < inferences, f"{model}: no request was batched ({executions} runs)"
