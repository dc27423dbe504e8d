"""The load generator's polling mode: a spinning client spends the wait for an answer on the
CPU, a sleeping one does not; both read every answer.

The server is a real HTTP/1.1 responder on loopback, in a thread of its own, that holds each
answer for :data:`HOLD_S`; the oracle is the client thread's CPU clock over the whole run.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.loadgen import Body, run_load

HOLD_S = 0.05
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def _serve(listener: socket.socket, stop: threading.Event) -> None:
    """Answer each request on each connection after :data:`HOLD_S`, until ``stop``."""
    listener.settimeout(0.1)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(0.1)
            buffered = b""
            while not stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                buffered += chunk
                while b"\r\n\r\n" in buffered:
                    head, _, rest = buffered.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(rest) < length:
                        break
                    buffered = rest[length:]
                    time.sleep(HOLD_S)
                    conn.sendall(_ANSWER)


@pytest.fixture
def slow_server() -> Iterator[str]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(listener, stop), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/floor"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _client_cpu_share(url: str, spin: bool) -> tuple[float, int, int]:
    """(client thread CPU seconds / wall seconds, answers, errors) of a 0.4 s run at c=1."""
    body = Body(b"{}", {"Content-Type": "application/json"})

    async def main() -> tuple[float, int, int]:
        cpu, wall = time.thread_time(), time.perf_counter()
        result = await run_load(
            url, [body], concurrency=1, duration_s=0.4, warmup_s=0.0, decode=False, spin=spin
        )
        share = (time.thread_time() - cpu) / (time.perf_counter() - wall)
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return share, result.completed, result.errors

    return asyncio.run(main())


def test_a_spinning_client_polls_through_the_wait_and_a_sleeping_one_sleeps(
    slow_server: str,
) -> None:
    sleeping, answered, errors = _client_cpu_share(slow_server, spin=False)
    assert errors == 0 and answered >= 4  # 0.4 s / 50 ms per answer, minus scheduling
    assert sleeping < 0.1, f"a sleeping client spent {sleeping:.0%} of the run on the CPU"
    spinning, answered, errors = _client_cpu_share(slow_server, spin=True)
    assert errors == 0 and answered >= 4
    # Spinning keeps the CPU busy whenever this thread is scheduled: on a loaded 2-CPU machine
    # that is still a large share of the run, far above the sleeping client's.
    assert spinning > 0.25, f"a spinning client spent only {spinning:.0%} on the CPU"
