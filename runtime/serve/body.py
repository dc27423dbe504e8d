"""Request bodies: read with a size limit, decompress gzip/deflate with the same limit
(against zip bombs), and read ``Inference-Header-Content-Length``.

The limit applies to the bytes received and again to the decompressed bytes; the header
length refers to the decompressed body (Triton's rule), so it is checked by the caller
against what this returns.

Length headers are decimal digits, leading zeros allowed (HTTP's ``1*DIGIT``): they are
compared as text first, since ``int()`` refuses more than 4,300 digits (a ValueError, which
would be a 500) and ``"0" * 4300 + "5"`` is a valid 5.
"""

from __future__ import annotations

import zlib

from starlette.requests import Request

from normport.runtime.serve.errors import BadRequest, PayloadTooLarge

__all__ = ["DEFAULT_MAX_BODY_BYTES", "expected_size", "header_length", "read_body"]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
HEADER_LENGTH = "inference-header-content-length"
# wbits: gzip wrapper (16 + 15); "deflate" is the zlib wrapper (RFC 9110), raw deflate tolerated.
_WBITS = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}
_MAX_DIGITS = 18  # every length of up to 18 digits fits an int64; more exceeds any body


_FRAMING = (b"content-length", b"content-encoding", HEADER_LENGTH.encode())
_SCOPE_KEY = "normport.framing"


def _framing(request: Request) -> dict[bytes, str]:
    """The headers that frame the body, read in one pass over the raw headers (the first of
    each name, as Starlette's ``Headers.get``) and kept in the request's scope: each request
    asks for them five times, and a ``Headers.get`` scans every header."""
    scope = request.scope
    found = scope.get(_SCOPE_KEY)
    if found is None:
        found = {}
        for name, value in scope["headers"]:
            if name in _FRAMING and name not in found:
                found[name] = value.decode("latin-1")
        scope[_SCOPE_KEY] = found
    return found


def _too_large(limit: int, what: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body {what} is over the limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed per ``Content-Encoding``.

    Raises:
        PayloadTooLarge: the body, or its decompressed form, is over ``limit`` bytes.
        BadRequest: an unsupported ``Content-Encoding`` or a corrupt compressed body.
    """
    framing = _framing(request)
    declared = _digits(framing.get(b"content-length"))
    if declared is not None and (len(declared) > _MAX_DIGITS or int(declared) > limit):
        shown = declared if len(declared) <= _MAX_DIGITS else f"a {len(declared)}-digit number of"
        raise _too_large(limit, f"({shown} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"(more than {limit} bytes)")
        chunks.append(chunk)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = framing.get(b"content-encoding", "identity").strip().lower()
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


def expected_size(request: Request, limit: int) -> int:
    """The body size to expect before reading it: ``Content-Length`` when it is valid and within
    ``limit``, else ``limit`` (chunked, absent, compressed: up to ``limit`` once decoded)."""
    framing = _framing(request)
    declared = _digits(framing.get(b"content-length"))
    encoding = framing.get(b"content-encoding", "identity").strip().lower()
    if declared is None or len(declared) > _MAX_DIGITS or encoding not in ("", "identity"):
        return limit
    return min(int(declared), limit)


def _digits(value: str | None) -> str | None:
    """The significant digits of a decimal header value (``"0"`` for zero); None when the
    header is absent or not ASCII digits."""
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit():
        return None
    return value.lstrip("0") or "0"


def header_length(request: Request) -> int | None:
    """``Inference-Header-Content-Length`` as an int, None when absent.

    Raises:
        BadRequest: present but not a non-negative integer, or more than 18 digits long (over
            any body); the message names the model of the request's path.
    """
    value = _framing(request).get(HEADER_LENGTH.encode())
    if value is None:
        return None
    digits = _digits(value)
    model = request.path_params.get("model")
    where = f"model '{model}': " if model is not None else ""
    if digits is None:
        raise BadRequest(
            f"{where}Inference-Header-Content-Length must be an integer >= 0, "
            f"got {value.strip()[:40]!r}"
        )
    if len(digits) > _MAX_DIGITS:
        raise BadRequest(
            f"{where}Inference-Header-Content-Length has {len(digits)} digits: larger than "
            "any request body"
        )
    return int(digits)
