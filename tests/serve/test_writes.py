"""One write per response (:mod:`runtime.serve.writes`): the head waits for the body and goes
out with it; nothing else is held, reordered or lost.

Unit tests count the writes on a recording transport; the end-to-end ones run the service's
uvicorn settings on loopback with a raw socket client, which sees the bytes on the wire.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from benchmarks.http_floor import lifespan
from normport.runtime.serve.server import BackgroundServer
from normport.runtime.serve.writes import JOIN_MAX_BYTES, CoalescingTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


class _Cycle:
    response_started = False


def _pair() -> tuple[CoalescingTransport, _Recorder, _Cycle]:
    recorder, cycle = _Recorder(), _Cycle()
    return CoalescingTransport(recorder, cycle), recorder, cycle  # type: ignore[arg-type]


def test_the_head_goes_out_with_the_body_in_one_write() -> None:
    transport, recorder, cycle = _pair()
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: at once
    assert recorder.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    transport.write(HEAD)
    assert len(recorder.writes) == 1  # held
    transport.write(memoryview(b"hello"))
    assert recorder.writes[1:] == [HEAD + b"hello"]
    transport.write(b"more")  # later writes pass as they come
    assert recorder.writes[2:] == [b"more"]
    assert transport.get_extra_info("peername") == "extra:peername"


def test_a_large_body_is_not_copied_and_a_close_sends_a_held_head() -> None:
    transport, recorder, cycle = _pair()
    cycle.response_started = True
    transport.write(HEAD)
    body = b"x" * (JOIN_MAX_BYTES + 1)
    transport.write(body)
    assert recorder.writes == [HEAD, body]

    transport, recorder, cycle = _pair()
    cycle.response_started = True
    transport.write(HEAD)
    transport.close()  # the app failed after starting its response: the head still goes out
    assert recorder.writes == [HEAD] and recorder.closed and transport.is_closing()


# -- end to end ---------------------------------------------------------------------------------


async def _app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """``/echo``: the request body back; ``/fail``: a started response, then an error."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = [(b"content-length", str(len(body)).encode()), (b"x-kind", b"echo")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if scope["path"] == "/fail":
        raise RuntimeError("failed after starting the response (expected by the test)")
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def echo() -> Iterator[BackgroundServer]:
    with BackgroundServer(_app) as server:
        yield server


def _read_until_closed_or(sock: socket.socket, enough: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while enough not in got and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_keep_alive_responses_arrive_whole_and_in_order(echo: BackgroundServer) -> None:
    with socket.create_connection((echo.host, echo.port)) as sock:
        for i in range(3):
            payload = f"request {i}".encode() * (i + 1)
            sock.sendall(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
                + payload
            )
            got = _read_until_closed_or(sock, payload)
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-kind: echo" in head
            assert body == payload


def test_expect_100_continue_is_answered_before_the_body_is_sent(echo: BackgroundServer) -> None:
    """The client sends its body only after ``100 Continue``: were that write held, neither
    side would move."""
    with socket.create_connection((echo.host, echo.port)) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        assert _read_until_closed_or(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(b"ping")
        got = _read_until_closed_or(sock, b"ping")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nping")


def test_a_response_that_fails_after_its_start_still_sends_its_head(
    echo: BackgroundServer,
) -> None:
    with socket.create_connection((echo.host, echo.port)) as sock:
        sock.sendall(b"POST /fail HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
        got = _read_until_closed_or(sock, b"never")
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-kind: echo" in got


def test_a_head_request_gets_its_head(echo: BackgroundServer) -> None:
    """uvicorn writes no body for HEAD: the head alone must go out, not wait for a body."""
    with socket.create_connection((echo.host, echo.port)) as sock:
        sock.sendall(b"HEAD /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        got = _read_until_closed_or(sock, b"\r\n\r\n", timeout=5.0)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n"), got
