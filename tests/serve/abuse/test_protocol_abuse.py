"""Clients that misbehave at the HTTP level, against the real CLI server over real sockets.

Each row plays one abuse and states what the abusive client must see: the answer (status and
JSON error naming the flag), and when the server closes the connection (seconds from opening
it; for the signal row, from the signal), plus what else the scenario measured.  For every
row, meanwhile, a keep-alive client polling ``/v2/health/live`` must never wait long (no one
else is stalled), and the server log must hold no traceback.  The shared server is stopped with
SIGINT at the end, which must exit 0 as well.

The shared server runs with short limits (header 2 s, body 1 s without progress, body deadline
2.5 s, keep-alive 1 s, headers 16 KiB) under RLIMIT_NOFILE soft 128 / hard 192, which it raises
to 192, so that its automatic connection cap is 192 - 64 = 128.  The signal rows each stop a
server of their own (``--exit-timeout`` 6 s and 1 s), started with it.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from normport.runtime.serve.server import EXIT_GRACE_S
from tests.serve.abuse.harness import (
    CliServer,
    Observed,
    Probe,
    build_repository,
    exchange,
    infer_body,
    parse_answer,
    read_until_close,
)

FLAGS = {
    "--header-timeout": 2,
    "--body-timeout": 1,
    "--body-deadline": 2.5,
    "--keep-alive-timeout": 1,
    "--max-header-bytes": 16384,
    "--exit-timeout": 5,
}
RLIMIT = (128, 192)
CAP = RLIMIT[1] - 64
EXIT_TIMEOUT = 6.0
SHORT_EXIT_TIMEOUT = 1.0

LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n"
LAST = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


def _post_head(length: int, model: str = "t_fp32") -> bytes:
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: test\r\nContent-Length: {length}"
    return head.encode() + b"\r\n\r\n"


@dataclass
class Context:
    server: CliServer  # FLAGS, under RLIMIT
    # one-use servers for the signal rows, by --exit-timeout: EXIT_TIMEOUT and SHORT_EXIT_TIMEOUT
    stoppable: dict[float, CliServer]


# -- scenarios: each plays one abuse and reports what the client saw ---------------------------


def _send(*steps: bytes | float) -> Callable[[Context], Observed]:
    """Bytes and pauses on one connection, then read until the server closes it."""
    return lambda ctx: exchange(ctx.server.port, steps, wait=8.0)


def _huge_header(ctx: Context) -> Observed:
    """Stream a 256 MiB header value; the answer must come long before it is all sent."""
    sock = socket.create_connection(("127.0.0.1", ctx.server.port), timeout=10)
    opened, sent, chunk = time.monotonic(), 0, b"a" * (1 << 20)
    try:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nX-Big: ")
        while sent < 256 << 20:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    with sock:
        raw, closed_after = read_until_close(sock, opened, 8.0)
    status, error = parse_answer(raw)
    return Observed(status, error, closed_after, {"stopped_early": sent < 64 << 20})


def _connection_flood(ctx: Context) -> Observed:
    """Open 8 connections more than the cap (the probe holds one more): the last ones are
    answered 503 at once; once they are closed, a new connection is served."""
    socks: list[socket.socket] = []
    try:
        for _ in range(CAP + 8):
            socks.append(socket.create_connection(("127.0.0.1", ctx.server.port), timeout=5))
        opened = time.monotonic()
        answers = [read_until_close(s, opened, 2.0) for s in socks[-8:]]
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    served_after = exchange(ctx.server.port, (LIVE,), wait=4.0).status == 200
    raw, closed_after = answers[-1]
    status, error = parse_answer(raw)
    refused = all(parse_answer(raw)[0] == 503 for raw, _ in answers)
    return Observed(
        status, error, closed_after, {"last_8_refused": refused, "served": served_after}
    )


def _counts(server: CliServer) -> dict[str, float]:
    stats = server.get_json("/v2/models/t_fp32/stats")["model_stats"][0]["inference_stats"]
    metrics = server.get_text("/metrics")
    failures = re.search(r'normport_inference_failures_total\{model="t_fp32",version="1"\} (\S+)',
                         metrics)  # fmt: skip
    assert failures is not None, metrics
    return {
        "fail": stats["fail"]["count"],
        "success": stats["success"]["count"],
        "metrics_failures": float(failures[1]),
    }


def _disconnect_mid_body(ctx: Context) -> Observed:
    """Send half a body and hang up: the statistics and metrics must not move."""
    before = _counts(ctx.server)
    with socket.create_connection(("127.0.0.1", ctx.server.port), timeout=5) as sock:
        sock.sendall(_post_head(200) + b'{"inputs": [{"name": "x", ')
        time.sleep(0.3)
    time.sleep(0.5)  # the server sees the disconnect
    after = _counts(ctx.server)
    return Observed(extra={name: after[name] - before[name] for name in after})


def _post(server: CliServer, model: str, values: list[float]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.base}/v2/models/{model}/infer", data=infer_body(values), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return {"status": r.status, "data": json.loads(r.read())["outputs"][0]["data"]}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "data": None}
    except OSError as e:
        return {"status": repr(e), "data": None}


def _spin_iterations(server: CliServer, seconds: float) -> int:
    """How many ``spin`` iterations take about ``seconds`` on this machine."""
    start = time.perf_counter()
    assert _post(server, "spin", [20000.0, 0.0, 0.0])["status"] == 200
    per_iteration = (time.perf_counter() - start) / 20000
    return int(min(max(seconds / per_iteration, 20000), 4_000_000))


def _signal_mid_request(sig: signal.Signals) -> Callable[[Context], Observed]:
    """A request computing for ~1 s and a half-sent body, then ``sig``: the half-sent body
    is answered 503 at once, the computing request completes, the process exits 0."""

    def run(ctx: Context) -> Observed:
        with ctx.stoppable[EXIT_TIMEOUT] as server:
            n = _spin_iterations(server, 1.0)
            in_flight: dict[str, Any] = {}
            thread = threading.Thread(
                target=lambda: in_flight.update(_post(server, "spin", [float(n), 0.0, 0.0]))
            )
            thread.start()
            partial = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            partial.sendall(_post_head(200, "spin") + b'{"inputs": [')
            time.sleep(0.4)  # the spin request is computing
            signalled = time.monotonic()
            server.process.send_signal(sig)
            with partial:  # held open until the process is gone
                raw, closed_after = read_until_close(partial, signalled, 2.0)
                status = server.wait(EXIT_TIMEOUT + 4)
                exited_after = time.monotonic() - signalled
            thread.join(30)
            answer, error = parse_answer(raw)
            return Observed(answer, error, closed_after, {
                "exit_status": status,
                "exited_in_time": exited_after < EXIT_TIMEOUT + 2,
                "in_flight": in_flight.get("status"),
                "in_flight_data": in_flight.get("data") == [float(n), 0.0, 0.0],
                "traceback": "Traceback" in server.log(),
            })  # fmt: skip

    return run


def _run_past_the_exit_timeout(ctx: Context) -> Observed:
    """A run inside onnxruntime for ~10 s, then SIGTERM with ``--exit-timeout 1``: uvicorn
    cancels the request at 1 s (its plain-text 500), and the process exits 0 at the hard
    deadline (exit timeout + EXIT_GRACE_S), not when onnxruntime is done."""
    with ctx.stoppable[SHORT_EXIT_TIMEOUT] as server:
        n = _spin_iterations(server, 10.0)
        in_flight: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: in_flight.update(_post(server, "spin", [float(n), 0.0, 0.0]))
        )
        thread.start()
        time.sleep(0.4)  # the spin request is computing
        signalled = time.monotonic()
        status = server.signal_and_wait(signal.SIGTERM, 15)
        exited_after = time.monotonic() - signalled
        thread.join(30)
    return Observed(in_flight.get("status"), "", exited_after, {"exit_status": status})


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    scenario: Callable[[Context], Observed]
    status: int | None  # the answer; None: closed without one
    error: str  # regex the JSON error must match ("": no JSON error)
    # (min, max) seconds to the server's close (the signal rows: from the signal; the exit
    # timeout row: to the exit); None: the server did not close it
    closed_within: tuple[float, float] | None
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("partial_headers", _send(b"GET /v2/health/live HTTP/1.1\r\nHost: te"), 408,
         r"^request headers not received within 2 s \(--header-timeout\)$", (1.8, 4.5)),
    Case("nothing_sent", _send(), None, "", (1.8, 4.5)),
    Case("partial_body", _send(_post_head(100) + b'{"inputs'), 408,
         r"^request body stalled: no bytes for 1 s \(--body-timeout\)$", (0.8, 3.0)),
    Case("trickled_body", _send(_post_head(1000), *(b"x", 0.4) * 12), 408,
         r"^request body not received within 2.5 s \(--body-deadline\)$", (2.3, 4.5)),
    Case("idle_keep_alive", _send(LIVE), 200, "", (0.8, 3.0)),
    Case("body_after_early_answer", _send(_post_head(100_000_000) + b"{"), 413,
         r"over the limit of \d+ bytes", (0.8, 3.0)),
    Case("malformed_request", _send(b"G\x00T / HTTP/1.1\r\n\r\n"), 400,
         r"^Invalid HTTP request received \(malformed HTTP/1.1\)$", (0.0, 1.0)),
    Case("huge_header", _huge_header, 431,
         r"^request line and headers over 16384 bytes \(--max-header-bytes\)$", (0.0, 2.0),
         {"stopped_early": True}),
    # not a defect: pipelining past the header budget in one read must still work (400
    # requests, 17.6 KB, sent at once: the 16 KiB budget is spent and renewed per request)
    Case("pipelined_requests", _send(LIVE * 399 + LAST), 200, "", (0.0, 5.0),
         {"answers": 400}),
    Case("connection_flood", _connection_flood, 503,
         rf"^too many open connections \(limit {CAP}, --max-connections\)$", (0.0, 1.5),
         {"last_8_refused": True, "served": True}),
    Case("disconnect_mid_body", _disconnect_mid_body, None, "", None,
         {"fail": 0, "success": 0, "metrics_failures": 0}),
    Case("sigterm_mid_request", _signal_mid_request(signal.SIGTERM), 503,
         r"^the server is shutting down; the request was not fully received$", (0.0, 1.0),
         {"exit_status": 0, "exited_in_time": True, "in_flight": 200, "in_flight_data": True,
          "traceback": False}),
    Case("run_past_the_exit_timeout", _run_past_the_exit_timeout, 500, "",
         (SHORT_EXIT_TIMEOUT + EXIT_GRACE_S - 0.5, SHORT_EXIT_TIMEOUT + EXIT_GRACE_S + 2.5),
         {"exit_status": 0}),
]  # fmt: skip


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    tmp = tmp_path_factory.mktemp("protocol_abuse")
    spin = build_repository(tmp / "spin", "spin")
    identity = build_repository(tmp / "identity", "t_fp32")
    with contextlib.ExitStack() as stack:  # every server starts now, side by side
        stoppable = {}
        for timeout in (EXIT_TIMEOUT, SHORT_EXIT_TIMEOUT):
            (workdir := tmp / f"exit_timeout_{timeout:g}").mkdir()
            one = CliServer(spin, workdir, {"--exit-timeout": timeout})
            stoppable[timeout] = stack.enter_context(one)
        (tmp / "server").mkdir()
        server = CliServer(identity, tmp / "server", FLAGS, rlimit_nofile=RLIMIT)
        stack.enter_context(server)
        yield Context(server, stoppable)
        # SIGINT (SIGTERM has its row): a graceful stop and exit status 0 as well
        assert server.signal_and_wait(signal.SIGINT, 15) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_abuse(case: Case, context: Context) -> None:
    log_start = context.server.log_size()
    with Probe(context.server.port) as probe:
        seen = case.scenario(context)
    log = context.server.log(log_start)
    assert seen.status == case.status, seen
    assert re.search(case.error, seen.error) if case.error else seen.error == "", seen
    if case.closed_within is None:
        assert seen.closed_after is None, seen
    else:
        low, high = case.closed_within
        assert seen.closed_after is not None and low <= seen.closed_after <= high, seen
    assert {k: seen.extra.get(k) for k in case.extra} == case.extra, seen
    assert probe.answered > 0 and probe.worst < 1.5, (probe.answered, probe.worst)
    assert "Traceback" not in log and "Too many open files" not in log, log


def test_the_descriptor_limit_is_raised_and_sets_the_connection_cap(context: Context) -> None:
    soft, hard = RLIMIT
    line = f"RLIMIT_NOFILE soft {hard} hard {hard}: at most {CAP} open connections"
    assert line in context.server.log(), context.server.log()
    assert soft < hard  # the server raised it
