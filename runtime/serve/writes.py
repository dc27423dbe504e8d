"""One write per response: the status line and headers go out with the body.

uvicorn's response cycle writes a response in two ``transport.write`` calls: the status line
and headers when the app sends ``http.response.start``, then the body.  On a connection that
can take them, each is a ``send`` system call and its own TCP segment (uvloop writes at once,
and sets ``TCP_NODELAY``), so the client wakes up twice for one answer.  For an infer answer of
a few hundred bytes, that second system call and wake-up is a sizeable part of what the server
spends on it.

:class:`CoalescingTransport` is what a response cycle writes to (installed by
:class:`runtime.serve.protocol.LimitedHttpToolsProtocol` for each request): the first write
after the response has started, the status line and headers, is held, and goes out joined to
the next write, the body's first bytes, in one ``write``.  A body over
:data:`JOIN_MAX_BYTES` is not copied: the head goes out first, then the body, as before.
Anything written before the response starts (``100 Continue``) passes at once, and a close
sends a held head first, so the bytes on the wire are the same as without it, in fewer
segments.  A HEAD request's cycle is left as it is: uvicorn writes no body for it, so its head
would wait for a write that never comes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["JOIN_MAX_BYTES", "CoalescingTransport"]

JOIN_MAX_BYTES = 64 * 1024


class _Cycle(Protocol):
    response_started: bool


class CoalescingTransport:
    """``transport`` as one response ``cycle`` writes to it (module docstring); every other
    attribute is the transport's."""

    __slots__ = ("_cycle", "_head_seen", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: _Cycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if not self._head_seen and self._cycle.response_started:
            self._head_seen = True  # uvicorn writes the whole head in one call, then the body
            self._held = bytes(data)
            return
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= JOIN_MAX_BYTES:
                data = b"".join((held, data))
            else:
                self._transport.write(held)
        self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now."""
        held, self._held = self._held, None
        if held is not None:
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
