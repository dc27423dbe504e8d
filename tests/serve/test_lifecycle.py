"""Graceful shutdown, onnxruntime off the event loop, the CLI, the in-process app, and the
connection limits' settings (their enforcement: tests/serve/abuse/test_protocol_abuse.py)."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from normport.runtime.serve import create_app
from normport.runtime.serve.cli import main
from normport.runtime.serve.limits import FD_RESERVE, HttpLimits, connection_cap, fd_soft_limit
from normport.runtime.serve.server import BackgroundServer, uvicorn_config


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

    def held_run(feeds, **options):  # the first run blocks in the worker thread till the gate opens
        entered.set()
        gate.wait(20)
        return real_run(feeds, **options)

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
        (["--threads", "-1"], "--threads: must be >= 0, got -1"),
        (["--max-body-bytes", "0"], "must be > 0"),
        (["--header-timeout", "0"], "--header-timeout: must be a number of seconds > 0, got 0"),
        (["--body-timeout", "-1"], "--body-timeout: must be a number of seconds > 0, got -1"),
        (["--body-deadline", "nan"], "--body-deadline: must be a number of seconds > 0, got nan"),
        (["--keep-alive-timeout", "x"], "--keep-alive-timeout: must be a number of seconds > 0"),
        (["--exit-timeout", "inf"], "--exit-timeout: must be a number of seconds > 0, got inf"),
        (["--max-header-bytes", "0"], "--max-header-bytes: must be > 0, got 0"),
        (["--max-connections", "-1"], "--max-connections: must be >= 0, got -1"),
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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("header_timeout", 0, r"header_timeout must be a finite number > 0, got 0"),
        ("body_timeout", float("nan"), r"body_timeout must be a finite number > 0, got nan"),
        ("body_deadline", -1.0, r"body_deadline must be a finite number > 0, got -1.0"),
        ("keep_alive_timeout", float("inf"), r"keep_alive_timeout .* got inf"),
        ("max_header_bytes", 0, r"max_header_bytes must be a finite number > 0, got 0"),
        ("max_connections", -1, r"max_connections must be a finite number >= 0, got -1"),
        ("exit_timeout", "30", r"exit_timeout must be a finite number > 0, got '30'"),
    ],
)
def test_limits_reject_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HttpLimits(**{field: value})


@pytest.mark.parametrize("value", [-1e-6, 0.011, float("nan"), "0.001", True])
def test_create_app_rejects_a_bad_busy_poll_window(value: object, small_repo: Path) -> None:
    message = r"busy_poll_s must be a number of seconds in \[0, 0.01\], got " + re.escape(
        repr(value)
    )
    with pytest.raises(ValueError, match=message):
        create_app(small_repo, busy_poll_s=value)  # type: ignore[arg-type]


def test_limits_reach_uvicorn() -> None:
    limits = HttpLimits(keep_alive_timeout=7.5, exit_timeout=12.0, max_connections=0)
    config = uvicorn_config(object(), "127.0.0.1", 0, limits=limits)
    assert (config.timeout_keep_alive, config.timeout_graceful_shutdown) == (7.5, 12.0)
    assert config.http.keywords == {"limits": limits, "max_connections": connection_cap(0)}
    soft = fd_soft_limit()
    assert connection_cap(0) == (soft - FD_RESERVE if soft > 0 else 1024 - FD_RESERVE)
    assert connection_cap(300) == 300


def test_background_server_enforces_its_limits(small_repo) -> None:
    """The limits given to BackgroundServer reach each connection (a partial request line is
    answered 408 after header_timeout, not left open)."""
    limits = HttpLimits(header_timeout=0.3, keep_alive_timeout=0.3)
    with BackgroundServer(create_app(small_repo), limits=limits) as server:
        sock = socket.create_connection((server.host, server.port), timeout=10)
        start = time.monotonic()
        with sock:
            sock.sendall(b"GET /v2/health/li")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert answer.endswith(
        b'{"error":"request headers not received within 0.3 s (--header-timeout)"}'
    )
    assert 0.25 <= elapsed < 5, elapsed
