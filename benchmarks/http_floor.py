"""The HTTP floor: the service's own uvicorn settings serving an app that does nothing.

    python -m benchmarks.http_floor --port PORT

:func:`runtime.serve.server.uvicorn_config` (uvicorn, httptools, normport's limits protocol)
with a bare ASGI app that reads each request's body and answers a fixed 12-byte JSON body.
What the serve benchmark measures against it, with the same load generator and placement as
the real servers, is the part of a request's latency and cost that no handler can remove: the
HTTP server, loopback TCP, the client, and the machine's wake-ups.  The difference between a
served row and the floor is what normport's handler and onnxruntime add.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from normport.runtime.serve.server import Server, serve_until_signalled, uvicorn_config

__all__ = ["BODY", "app", "lifespan", "main"]

BODY = b'{"floor":1}\n'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def lifespan(receive, send) -> None:  # type: ignore[no-untyped-def]
    """Acknowledge every lifespan event until the shutdown."""
    while True:
        message = await receive()
        kind = message["type"].removeprefix("lifespan.")
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    """Reads the request body, answers :data:`BODY`; lifespan events are acknowledged."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False) and message["type"] == "http.request"
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve_until_signalled(Server(uvicorn_config(app, "127.0.0.1", args.port, "warning")))


if __name__ == "__main__":
    main()
