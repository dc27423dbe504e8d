"""Graceful shutdown, onnxruntime off the event loop, the CLI, and the in-process app."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from runtime.serve import create_app
from runtime.serve.cli import main
from runtime.serve.server import BackgroundServer


@pytest.fixture
def small_repo(repo_root: Path, tmp_path: Path) -> Path:
    for name in ("t_fp32", "pair"):
        shutil.copytree(repo_root / name, tmp_path / name)
    return tmp_path


def body(value: float) -> bytes:
    x = [[value] * 3]
    return orjson.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": x}]})


def test_shutdown_finishes_in_flight_requests_and_onnxruntime_is_off_the_loop(small_repo) -> None:
    app = create_app(small_repo, threads=1)
    session = app.state.repository.models["t_fp32"]["1"].session
    entered, gate = threading.Event(), threading.Event()
    real_run = session.run

    def held_run(feeds):  # the first run blocks in the worker thread until the gate opens
        entered.set()
        gate.wait(20)
        return real_run(feeds)

    session.run = held_run
    server = BackgroundServer(app).start()
    base = f"http://{server.url}"

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            calls = [asyncio.ensure_future(c.post("/v2/models/t_fp32/infer", content=body(v)))
                     for v in range(6)]  # fmt: skip
            await asyncio.to_thread(entered.wait, 20)
            await asyncio.sleep(0.05)  # the other five are queued behind the held run
            start = time.perf_counter()
            live = await c.get("/v2/health/live")  # the event loop is free meanwhile
            assert live.status_code == 200 and time.perf_counter() - start < 5
            stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
            await asyncio.sleep(0.2)
            assert not stopping.done()  # waits for the in-flight requests
            gate.set()
            responses = await asyncio.gather(*calls)
            await stopping
            return responses

    responses = asyncio.run(asyncio.wait_for(scenario(), 60))
    for value, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [float(value)] * 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/v2/health/live", timeout=2)


def test_in_process_app(small_repo) -> None:
    """The ASGI app without a socket (httpx's ASGI transport)."""
    app = create_app(small_repo)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            assert (await c.get("/v2/health/ready")).json() == {"ready": True}
            r = await c.post("/v2/models/t_fp32/infer", content=body(1.5))
            assert r.json()["outputs"][0]["data"] == [1.5] * 3
            a = np.arange(4, dtype=np.float32)[None]
            header = orjson.dumps({
                "inputs": [{"name": n, "shape": [1, 4], "datatype": "FP32",
                            "parameters": {"binary_data_size": 16}} for n in "ab"],
                "outputs": [{"name": "sum", "parameters": {"binary_data": True}}],
            })  # fmt: skip
            r = await c.post("/v2/models/pair/infer", content=header + a.tobytes() + a.tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
            n = int(r.headers["inference-header-content-length"])
            assert r.headers["content-type"] == "application/octet-stream"
            assert np.array_equal(np.frombuffer(r.content[n:], np.float32), (a + a)[0])
            assert (await c.get("/v2/nope")).json() == {"error": "Not Found"}

    asyncio.run(scenario())


def test_an_unexpected_error_is_a_json_500(small_repo) -> None:
    app = create_app(small_repo)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    app.state.repository.resolve = broken

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            return await c.post("/v2/models/t_fp32/infer", content=body(1.0))

    r = asyncio.run(scenario())
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error (RuntimeError)"}


def test_two_apps_in_one_process_have_their_own_metrics(small_repo) -> None:
    first, second = create_app(small_repo), create_app(small_repo)
    assert first.state.metrics.registry is not second.state.metrics.registry


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repository", "/nonexistent/repository"], "is not a folder"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--max-body-bytes", "0"], "must be > 0"),
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_strict_readiness(repo_root: Path, small_repo: Path) -> None:
    async def ready(app) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            return (await c.get("/v2/health/ready")).status_code

    shutil.copytree(repo_root / "broken_truncated", small_repo / "broken_truncated")
    assert asyncio.run(ready(create_app(small_repo))) == 200
    assert asyncio.run(ready(create_app(small_repo, strict_readiness=True))) == 503
