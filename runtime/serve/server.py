"""Running uvicorn: the settings the service uses, the server (port file, exit status 0 after a
signal), and :class:`BackgroundServer` for tests, benchmarks and embedding."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

import uvicorn
from starlette.types import ASGIApp
from uvicorn.server import HANDLED_SIGNALS

from normport.runtime.serve.limits import HttpLimits, connection_cap
from normport.runtime.serve.protocol import LimitedHttpToolsProtocol

__all__ = ["EXIT_GRACE_S", "BackgroundServer", "Server", "serve_until_signalled", "uvicorn_config"]

log = logging.getLogger(__name__)

EXIT_GRACE_S = 2.0  # after the exit timeout, for the lifespan shutdown (onnxruntime workers)


def uvicorn_config(
    app: ASGIApp, host: str, port: int, log_level: str = "info", *, limits: HttpLimits | None = None
) -> uvicorn.Config:
    """The uvicorn settings the service runs with (shared by the CLI, tests and benchmark):
    uvicorn's httptools protocol with ``limits`` enforced (:mod:`runtime.serve.protocol`)."""
    limits = HttpLimits() if limits is None else limits
    protocol = functools.partial(
        LimitedHttpToolsProtocol,
        limits=limits,
        max_connections=connection_cap(limits.max_connections),
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,  # type: ignore[arg-type]  # uvicorn calls any protocol factory
        ws="none",  # no WebSocket routes: an Upgrade request is served as plain HTTP
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # float works
        timeout_graceful_shutdown=limits.exit_timeout,  # type: ignore[arg-type]
        lifespan="on",
        # X-Forwarded-* is not trusted (nor parsed, which also saves time per request).
        proxy_headers=False,
    )


class Server(uvicorn.Server):
    """``uvicorn.Server`` that, once accepting, logs ``serving on http://HOST:PORT`` and writes
    the port to ``port_file`` (atomically: a reader never sees a partial file); and that, once
    signalled, exits at the latest ``timeout_graceful_shutdown`` + :data:`EXIT_GRACE_S` seconds
    later (status 0).

    That hard deadline is for onnxruntime: at the exit timeout uvicorn cancels the requests
    still running, but a run already inside onnxruntime cannot be interrupted from here, and its
    worker thread would hold the process (the lifespan shutdown and the interpreter both wait
    for it).  Triton's ``--exit-timeout-secs`` likewise exits with inferences in flight.
    """

    def __init__(self, config: uvicorn.Config, port_file: str | os.PathLike | None = None) -> None:
        super().__init__(config)
        self.port_file = port_file
        self.port: int | None = None
        self._deadline: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        timeout = self.config.timeout_graceful_shutdown
        if self._deadline is None and timeout is not None:
            self._deadline = threading.Timer(timeout + EXIT_GRACE_S, _exit_now, (timeout,))
            self._deadline.daemon = True
            self._deadline.start()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, self.port = self.servers[0].sockets[0].getsockname()[:2]
        log.info("serving on http://%s:%d", f"[{host}]" if ":" in host else host, self.port)
        if self.port_file is not None:
            path = Path(self.port_file)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(f"{self.port}\n")
            partial.replace(path)


def _exit_now(timeout: float) -> None:
    log.error("still stopping %g s after the exit timeout of %g s: exiting now", EXIT_GRACE_S,
              timeout)  # fmt: skip
    logging.shutdown()
    os._exit(0)


def serve_until_signalled(server: uvicorn.Server) -> None:
    """Run ``server`` in the main thread until SIGINT/SIGTERM and its graceful shutdown.

    uvicorn, once shut down, re-raises the signal that stopped it for the handler in place
    before it started: by default SIGTERM then kills the process (status 143) and SIGINT raises
    KeyboardInterrupt.  That handler is the server's own ``handle_exit`` here, so the re-raise
    does nothing and the caller exits normally; a signal in the instant before uvicorn installs
    its handlers also becomes a shutdown.
    """
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in HANDLED_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """``with BackgroundServer(app) as server: ... server.url ...``

    Binds ``host:port`` (port 0: a free one) before starting, so :attr:`port` is known at once;
    leaving the block shuts down gracefully (in-flight requests finish, then the lifespan ends).
    ``limits`` as for ``python -m runtime serve``; the file-descriptor limit is the process's
    own (only the CLI raises it).
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        *,
        limits: HttpLimits | None = None,
    ) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self.limits = HttpLimits() if limits is None else limits
        config = uvicorn_config(app, host, self.port, log_level, limits=self.limits)
        self.server = Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        """``host:port``, as tritonclient takes it."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, finish in-flight requests (at most ``limits.exit_timeout`` s), run
        the lifespan shutdown; waits ``timeout`` s (default: the exit timeout plus 10 s)."""
        self.server.should_exit = True
        self._thread.join(self.limits.exit_timeout + 10 if timeout is None else timeout)
        self._socket.close()
        if self._thread.is_alive():
            raise RuntimeError("the server did not stop in time")

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
