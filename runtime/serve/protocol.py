"""HTTP/1.1 connections with bounded time and resources: uvicorn's httptools protocol plus a
header-read timeout, a body-read timeout and deadline, a header-size limit and a connection cap
(the bounds and their flags: :mod:`runtime.serve.limits`).

One connection, and the bound on each wait::

    open ─header_timeout─> headers end ─body_timeout (no progress), body_deadline─> body end
      ─(the app runs)─> response sent ─keep_alive_timeout (idle)─> first byte of the next request
      ─header_timeout─> headers end ─...

What the server answers itself (JSON ``{"error": ...}``, then closes the connection):

* 431: the request line and headers pass ``max_header_bytes``.  Parsing stops at the limit: at
  most ``max_header_bytes`` are fed to httptools, the rest is never read.
* 408: some of the request arrived but its headers, or its body, did not in time.  A connection
  on which nothing of a request arrived (just opened, or idle after a response) is closed
  without an answer, as every HTTP server does.
* 503: a connection over ``max_connections`` (answered at accept, before reading anything);
  and, on shutdown, a request still being received.
* 400: httptools could not parse the request (malformed request line, header or chunked
  framing, bad Content-Length).  uvicorn decides this and logs "Invalid HTTP request
  received."; only the answer is ours (``send_400_response``), with uvicorn's generic message:
  uvicorn does not pass on httptools' reason.

Only uvicorn answers this, in its own format:

* 500 ``text/plain`` "Internal Server Error": the app raised before starting a response.  The
  app's own handlers answer JSON first, so this is only (a) a request still running when the
  exit timeout passes, which uvicorn cancels (``asyncio.CancelledError`` is no ``Exception``
  for Starlette's handlers; uvicorn also logs its traceback), and (b) a bug in error handling.

Counting is exact for a request that starts a read (every request but a pipelined one): a
request pipelined behind another in the same read may pass ``max_header_bytes`` by the rest of
that read (at most 256 KiB) before the limit stops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from normport.runtime.serve.limits import HttpLimits
from normport.runtime.serve.writes import CoalescingTransport

__all__ = ["LimitedHttpToolsProtocol"]

log = logging.getLogger(__name__)

# What the connection is receiving: nothing of a request yet, its request line and headers, its
# body; or nothing more (_DONE: answered and closing, by this class or httptools' 400).
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3
_FULL_LOG_EVERY_S = 10.0  # a connection flood logs one line per this many seconds


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with :class:`HttpLimits` enforced; uvicorn builds one per
    connection (``uvicorn.Config(http=functools.partial(LimitedHttpToolsProtocol, limits=...,
    max_connections=...))``).  The hot path (a whole request in one read) arms no timer."""

    _last_full_log = 0.0  # class-wide: rate-limits the over-capacity warning

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
        max_connections: int,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.max_connections = max_connections
        self._timer: asyncio.TimerHandle | None = None
        self._reading = _IDLE
        self._max_head = limits.max_header_bytes
        self._head_bytes = 0  # of the request line and headers being received
        self._body_start = self._body_progress = 0.0  # loop.time() of the body's first/last bytes

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._reading = _DONE
            self._log_full()
            transport.write(self._answer(503, self._full_message()))
            transport.close()
            return
        self._arm(self.limits.header_timeout, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data:
            reading = self._reading
            if reading == _BODY:
                self._body_progress = self.loop.time()
                super().data_received(data)
                break
            if reading == _DONE:
                return
            room = self._max_head - self._head_bytes
            if len(data) <= room:  # the hot path: a whole request in one read ends here
                self._head_bytes += len(data)
                super().data_received(data)
                break
            # Past the header budget: feed only what fits.  If the headers ended within it
            # (on_message_complete zeroes _head_bytes: what follows is the next request), carry
            # on with the rest; else answer 431 without reading another byte.
            self._head_bytes += room
            if room > 0:
                super().data_received(data[:room])
                if self.transport.is_closing():
                    return
            if self._reading != _BODY and self._head_bytes != 0:
                limit = f"{self._max_head} bytes (--max-header-bytes)"
                self._refuse(431, f"request line and headers over {limit}")
                return
            data = data[room:]
        if self._reading != _IDLE and self._timer is None and not self.transport.is_closing():
            self._arm_read_timer()

    def shutdown(self) -> None:
        """Graceful shutdown: a request still being received is answered 503 at once (the client
        may retry it elsewhere); requests being processed finish, idle connections close."""
        if self._reading in (_HEAD, _BODY) and not self.pipeline:
            self._refuse(503, "the server is shutting down; the request was not fully received")
        else:
            super().shutdown()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reading = _HEAD
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading = _BODY
        if self._timer is not None:
            self._disarm()
        super().on_headers_complete()
        cycle = self.cycle  # this request's (not after an upgrade: that keeps the old one)
        # HEAD: uvicorn writes no body, so a held head would never go out
        fresh = cycle is not None and cycle.transport is self.transport
        if fresh and cycle.scope["method"] != "HEAD":
            cycle.transport = CoalescingTransport(self.transport, cycle)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._reading = _IDLE
        self._head_bytes = 0
        if self._timer is not None:
            self._disarm()
        super().on_message_complete()
        answered_early = self.cycle.response_complete and not self.transport.is_closing()
        if answered_early and self.timeout_keep_alive_task is None:
            # answered before the body ended (413, 404...): uvicorn armed the keep-alive timer
            # at the response and the body's bytes disarmed it; arm it again.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    # -- timers --------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_read_timer(self) -> None:
        """A request is only partly here after this read: start its header or body clock."""
        if self._reading == _HEAD:
            self._arm(self.limits.header_timeout, self._head_expired)
        else:
            self._body_start = self._body_progress = self.loop.time()
            self._arm(min(self.limits.body_timeout, self.limits.body_deadline), self._body_due)

    def _head_expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._reading == _IDLE:  # nothing of a request since the connection opened
            self.transport.close()
            return
        timeout = self.limits.header_timeout
        self._refuse(408, f"request headers not received within {timeout:g} s (--header-timeout)")

    def _body_due(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now, limits = self.loop.time(), self.limits
        if self.flow.read_paused:  # the server is not reading (pipelining, app behind): not late
            self._body_progress = now
            self._arm(limits.body_timeout, self._body_due)
            return
        deadline = self._body_start + limits.body_deadline
        stalled_at = self._body_progress + limits.body_timeout
        if now >= deadline:
            message = f"request body not received within {limits.body_deadline:g} s"
            self._refuse(408, f"{message} (--body-deadline)")
        elif now >= stalled_at:
            message = f"request body stalled: no bytes for {limits.body_timeout:g} s"
            self._refuse(408, f"{message} (--body-timeout)")
        else:
            self._arm(min(deadline, stalled_at) - now, self._body_due)

    # -- answers -------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools cannot parse, as JSON."""
        self._disarm()
        self._reading = _DONE
        self.transport.write(self._answer(400, f"{msg.rstrip('.')} (malformed HTTP/1.1)"))
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` for the request being received and close the connection; when an
        earlier (pipelined) request is still being answered, close after its response."""
        self._disarm()
        reading, self._reading = self._reading, _DONE
        cycle = self.cycle
        in_flight = cycle is not None and not cycle.response_complete
        if reading == _BODY and cycle is not None:  # cycle is this request's own
            answered = cycle.response_started
            if in_flight:
                cycle.disconnected = True  # the app's receive() now returns http.disconnect
                cycle.message_event.set()
            if not answered:  # (an early answer, 413 say, already went out: just close)
                self.transport.write(self._answer(status, message))
            self.transport.close()
        elif in_flight:  # an earlier request is being answered: close once it is
            cycle.keep_alive = False
            self.flow.pause_reading()
        else:
            self.transport.write(self._answer(status, message))
            self.transport.close()
        log.debug("%s: %d %s", self._peer(), status, message)

    def _answer(self, status: int, message: str) -> bytes:
        body = orjson.dumps({"error": message})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        return b"".join([*head, body])

    def _full_message(self) -> str:
        return f"too many open connections (limit {self.max_connections}, --max-connections)"

    def _log_full(self) -> None:
        now = time.monotonic()
        cls = LimitedHttpToolsProtocol
        if now - cls._last_full_log >= _FULL_LOG_EVERY_S:
            cls._last_full_log = now
            log.warning("refusing connections with 503: %s", self._full_message())

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"
