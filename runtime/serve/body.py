"""Request bodies: read with a size limit, decompress gzip/deflate with the same limit
(against zip bombs), and read ``Inference-Header-Content-Length``.

The limit applies to the bytes received and again to the decompressed bytes; the header
length refers to the decompressed body (Triton's rule), so it is checked by the caller
against what this returns.
"""

from __future__ import annotations

import zlib

from starlette.requests import Request

from runtime.serve.errors import BadRequest, PayloadTooLarge

__all__ = ["DEFAULT_MAX_BODY_BYTES", "header_length", "read_body"]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
HEADER_LENGTH = "inference-header-content-length"
# wbits: gzip wrapper (16 + 15); "deflate" is the zlib wrapper (RFC 9110), raw deflate tolerated.
_WBITS = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}


def _too_large(limit: int, what: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body {what} is over the limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed per ``Content-Encoding``.

    Raises:
        PayloadTooLarge: the body, or its decompressed form, is over ``limit`` bytes.
        BadRequest: an unsupported ``Content-Encoding`` or a corrupt compressed body.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, f"({declared} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"(more than {limit} bytes)")
        chunks.append(chunk)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise BadRequest(f"unsupported Content-Encoding {encoding!r} (gzip, deflate, identity)")
    return _decompress(body, encoding, limit)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    error: zlib.error | None = None
    for wbits in _WBITS[encoding]:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, limit + 1)  # never more than limit + 1 bytes
        except zlib.error as e:
            error = e
            continue
        if len(data) > limit:
            raise _too_large(limit, "once decompressed")
        if not inflater.eof or inflater.unused_data:
            raise BadRequest(f"{encoding} request body is truncated or has trailing data")
        return data
    raise BadRequest(f"corrupt {encoding} request body: {error}")


def header_length(request: Request) -> int | None:
    """``Inference-Header-Content-Length`` as an int, None when absent.

    Raises:
        BadRequest: present but not a non-negative integer.
    """
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        raise BadRequest(f"Inference-Header-Content-Length must be an integer >= 0, got {value!r}")
    return int(value)
