"""A closed-loop HTTP load generator for infer requests, used by the serve benchmarks.

``concurrency`` workers, each on its own keep-alive connection, send one request, read and
decode the whole response, and send the next, for ``duration`` seconds after a ``warmup``;
each latency is measured around one request.  Request bodies are built once, up front, from
numpy inputs: JSON (``data`` lists, JSON outputs) or binary (``binary_data_size`` blobs,
binary outputs).

The client is a bare HTTP/1.1 protocol on the event loop (uvloop when installed) with
httptools' response parser, requests pre-serialized to bytes: about 25 us of CPU per request
where aiohttp spends 150-300 us.  On a small machine the client shares the CPUs with the
server, and its cost is part of every latency it measures: the leaner it is, the more the
numbers say about the server.  :func:`pin` puts the calling process on chosen CPUs; a client
pinned to a CPU of its own can ``spin``: poll its sockets instead of sleeping between answers.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httptools
import numpy as np
import orjson

__all__ = ["Body", "LoadResult", "build_body", "decode_output", "pin", "run", "run_load"]

T = TypeVar("T")


@dataclass(frozen=True)
class Body:
    """A prebuilt request: bytes and headers."""

    content: bytes
    headers: dict[str, str]


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    completed: int = 0  # successful requests, the warmup's included
    errors: int = 0
    first_error: str = ""
    elapsed_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")


_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def build_body(name: str, array: np.ndarray, output: str, *, binary: bool) -> Body:
    """One infer request for a single-input model (FP32 or INT64 input)."""
    entry: dict[str, Any] = {
        "name": name,
        "shape": list(array.shape),
        "datatype": _DATATYPE[array.dtype],
    }
    wanted = [{"name": output, "parameters": {"binary_data": binary}}]
    if not binary:
        entry["data"] = array.reshape(-1).tolist()
        doc = orjson.dumps({"inputs": [entry], "outputs": wanted})
        return Body(doc, {"Content-Type": "application/json"})
    blob = np.ascontiguousarray(array).tobytes()
    entry["parameters"] = {"binary_data_size": len(blob)}
    header = orjson.dumps({"inputs": [entry], "outputs": wanted})
    return Body(
        header + blob,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )


def decode_output(content: bytes, header_length: str | None) -> np.ndarray:
    """The first output of a response, as float32 (the benchmark models' outputs are FP32)."""
    if header_length is None:
        output = orjson.loads(content)["outputs"][0]
        return np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    n = int(header_length)
    output = orjson.loads(content[:n])["outputs"][0]
    return np.frombuffer(content, dtype=np.float32, offset=n).reshape(output["shape"])


def pin(cpus: Iterable[int] | None) -> None:
    """Run this process on ``cpus`` only (Linux; elsewhere, or for None, nothing)."""
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (it is, with ``uvicorn[standard]``)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(main)
    return uvloop.run(main)


def _request_bytes(host: str, path: str, body: Body) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body.content)}"]
    head += [f"{name}: {value}" for name, value in body.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body.content


class _Connection(asyncio.Protocol):
    """One keep-alive connection: :meth:`send` writes a request and returns its response's
    status, ``Inference-Header-Content-Length`` and body."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future | None = None
        self._chunks: list[bytes] = []
        self._header_length: str | None = None
        self._name = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(exception=e)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exception=exc or ConnectionError("the server closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self._header_length = value.decode()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._finish(result=(status, self._header_length, body))

    def _finish(
        self,
        result: tuple[int, str | None, bytes] | None = None,
        exception: Exception | None = None,
    ) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exception is not None:
            waiter.set_exception(exception)
        else:
            waiter.set_result(result)

    async def send(self, request: bytes) -> tuple[int, str | None, bytes]:
        assert self._transport is not None
        if self._transport.is_closing():
            raise ConnectionError("the connection is closed")
        self._chunks, self._header_length = [], None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def run_load(
    url: str,
    bodies: list[Body],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.3,
    timeout_s: float = 30.0,
    decode: bool = True,
    spin: bool = False,
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` closed-loop workers cycling through ``bodies``;
    ``decode``: each 200 answer must be an infer response (else: any 200 counts); ``spin``:
    the event loop polls its sockets without ever sleeping (:func:`_spin`), for a client that
    has a CPU of its own."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [_request_bytes(parts.netloc, parts.path, body) for body in bodies]
    loop = asyncio.get_running_loop()
    result = LoadResult()
    counter = itertools.count()
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def connect() -> _Connection:
        _, connection = await loop.create_connection(_Connection, host, port)
        return connection

    async def worker() -> None:
        connection: _Connection | None = None
        while (now := time.perf_counter()) < stop_at:
            request = requests[next(counter) % len(requests)]
            try:
                async with asyncio.timeout(timeout_s):
                    connection = connection or await connect()
                    status, header_length, content = await connection.send(request)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {content[:200]!r}")
                if decode:
                    decode_output(content, header_length)
            except Exception as e:  # counted, and the first one is reported
                result.errors += 1
                result.first_error = result.first_error or f"{type(e).__name__}: {e}"
                if connection is not None:
                    connection.close()
                    connection = None
                await asyncio.sleep(0.01)  # no busy loop against a server that is down
                continue
            result.completed += 1
            if now >= measure_from:
                result.latencies_s.append(time.perf_counter() - now)
        if connection is not None:
            connection.close()

    done = asyncio.Event()
    spinner = asyncio.create_task(_spin(done)) if spin else None
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        done.set()
        if spinner is not None:
            await spinner
    result.elapsed_s = max(time.perf_counter(), stop_at) - measure_from
    return result


async def _spin(done: asyncio.Event) -> None:
    """Keep a callback ready until ``done``, so that the event loop polls its sockets with a
    timeout of 0 instead of sleeping in ``epoll_wait``: an answer is read as soon as it lands,
    not after the wake-up of a sleeping thread (tens of microseconds on a VM), which would
    count in every latency measured at concurrency 1 but is not the server's."""
    while not done.is_set():
        await asyncio.sleep(0)
