"""A real ``python -m runtime serve`` child process and raw-socket clients, for protocol abuse.

- :func:`build_repository`: any of ``t_fp32`` (identity) and ``spin`` (identity after
  ``max(x)`` idle iterations of a Loop: a request whose compute time the client chooses).
- :class:`CliServer`: the CLI in a child process (optionally under a lower RLIMIT_NOFILE), its
  port from ``--port-file``, its log in a file.
- :func:`exchange`: send bytes and pauses on a raw socket, then read until the server closes.
- :class:`Probe`: a keep-alive client polling ``/v2/health/live`` in a thread; its worst latency
  tells whether other clients were stalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from normport.export.repository import write_model
from tests.serve.repo import MAX_BATCH, OPSET, identity

__all__ = ["CliServer", "Observed", "Probe", "build_repository", "exchange", "infer_body"]

ROOT = Path(__file__).resolve().parents[3]
# Runs ``python -m runtime <argv>`` after setting RLIMIT_NOFILE (soft, hard) from argv[1:3].
_LAUNCH = (
    "import resource, runpy, sys; "
    "soft, hard = int(sys.argv.pop(1)), int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)); "
    "runpy.run_module('runtime', run_name='__main__', alter_sys=True)"
)


def spin() -> onnx.ModelProto:
    """``y = x`` (FP32 ``[batch, 3]``) after ``int(max(x))`` iterations of ``v + (sin v - sin v)``."""
    v = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond"], ["cond_out"]),
            helper.make_node("Sin", ["v"], ["s"]),
            helper.make_node("Sub", ["s", "s"], ["zero"]),
            helper.make_node("Add", ["v", "zero"], ["v_out"]),
        ],
        "body",
        [
            v("i", TensorProto.INT64, []),
            v("cond", TensorProto.BOOL, []),
            v("v", TensorProto.FLOAT, None),
        ],
        [v("cond_out", TensorProto.BOOL, []), v("v_out", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["n"], to=TensorProto.INT64),
            helper.make_node("Loop", ["n", "", "x"], ["y"], body=body),
        ],
        "spin",
        [v("x", TensorProto.FLOAT, ["batch", 3])],
        [v("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


def build_repository(root: Path, *names: str) -> Path:
    """``root`` holding the models named (``t_fp32``, ``spin``); one server loads only what its
    tests use (each model costs start-up time)."""
    models = {"t_fp32": lambda: identity(TensorProto.FLOAT), "spin": spin}
    for name in names:
        write_model(root, name, models[name](), max_batch_size=MAX_BATCH)
    return root


def infer_body(values: list[float]) -> bytes:
    inputs = [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": values}]
    return json.dumps({"inputs": inputs}).encode()


class CliServer:
    """``python -m runtime serve --repository R --port 0 --port-file F <flags>``."""

    def __init__(
        self,
        repository: Path,
        workdir: Path,
        flags: dict[str, Any],
        rlimit_nofile: tuple[int, int] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port_file = workdir / "port"
        self.log_path = workdir / "server.log"
        argv = ["serve", "--repository", os.fspath(repository), "--port", "0"]
        argv += ["--port-file", os.fspath(self.port_file), "--log-level", "info"]
        for name, value in flags.items():
            argv += [name, str(value)]
        if rlimit_nofile is None:
            command = [sys.executable, "-m", "runtime", *argv]
        else:
            command = [sys.executable, "-c", _LAUNCH, *map(str, rlimit_nofile), *argv]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=self._log, stderr=self._log, env=env
        )
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port, once the server accepts (waits for the port file up to 120 s: the
        process is started at once, so several servers start side by side)."""
        deadline = time.monotonic() + 120.0
        while self._port is None:
            if self.port_file.exists():
                self._port = int(self.port_file.read_text())
            elif self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.log()}")
            else:
                time.sleep(0.05)
        return self._port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, since: int = 0) -> str:
        return self.log_path.read_bytes()[since:].decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.loads(r.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return r.read().decode()

    def signal_and_wait(self, sig: int, timeout: float) -> int | None:
        """Send ``sig``; the exit status, or None if the process is still running after
        ``timeout`` seconds."""
        self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the process still runs after ``timeout`` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._log.close()

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Observed:
    """What a client saw: the first response's status and JSON error (None: no answer), when
    the server closed the connection (seconds from connection open; None: it did not), and
    anything else a scenario measured."""

    status: int | None = None
    error: str = ""
    closed_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_answer(raw: bytes) -> tuple[int | None, str]:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    if not match:
        return None, ""
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"application/json" not in head.lower():
        return int(match[1]), ""
    try:
        return int(match[1]), str(json.loads(body).get("error", ""))
    except ValueError:
        return int(match[1]), ""


def read_until_close(sock: socket.socket, opened: float, wait: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes (then the seconds since ``opened``), or
    until ``wait`` seconds pass (then None)."""
    data = b""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, time.monotonic() - opened
        if not chunk:
            return data, time.monotonic() - opened
        data += chunk
    return data, None


def exchange(port: int, steps: tuple[bytes | float, ...], wait: float) -> Observed:
    """Open a connection, play ``steps`` (bytes: send; float: sleep that long), then read what
    the server answers until it closes or ``wait`` seconds pass.  A failed send (the server
    already closed) ends the steps."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened = time.monotonic()
    sent = 0
    try:
        for step in steps:
            if isinstance(step, bytes):
                sock.sendall(step)
                sent += len(step)
            else:
                time.sleep(step)
    except OSError:
        pass
    with sock:
        raw, closed_after = read_until_close(sock, opened, wait)
    status, error = parse_answer(raw)
    return Observed(status, error, closed_after, {"sent": sent, "answers": raw.count(b"HTTP/1.1 ")})


class Probe:
    """``with Probe(port) as probe: ...``: polls ``GET /v2/health/live`` on one keep-alive
    connection every ``period`` seconds (reconnecting if the server closes it);
    :attr:`worst` is the longest wait for an answer, :attr:`answered` the count."""

    def __init__(self, port: int, period: float = 0.05) -> None:
        self.port, self.period = port, period
        self.worst, self.answered = 0.0, 0
        self._stop = threading.Event()
        self._sock = self._connect()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _ask(self) -> bool:
        self._sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: probe\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self._sock.recv(4096)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower())[1])  # type: ignore[index]
        while len(body) < length:
            body += self._sock.recv(4096)
        return head.startswith(b"HTTP/1.1 200")

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                ok = self._ask()
            except OSError:
                ok = False
            self.worst = max(self.worst, time.monotonic() - start)
            if ok:
                self.answered += 1
            else:
                self._sock.close()
                with contextlib.suppress(OSError):
                    self._sock = self._connect()
            self._stop.wait(self.period)

    def __enter__(self) -> Probe:
        self._ask()  # the connection is in use before anything else happens
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._sock.close()
