"""Typed serving errors and the one table that maps them to HTTP status codes.

Handlers and helpers raise these; :func:`http_status` is the only place a status is chosen
(the app's exception handlers turn any of them into ``{"error": "<message>"}``).
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "InferenceFailed",
    "ModelNotFound",
    "ModelUnavailable",
    "PayloadTooLarge",
    "ServeError",
    "ServerBusy",
    "ServerNotReady",
    "http_status",
]


class ServeError(Exception):
    """Base of every error the service reports to a client; ``str(e)`` is the message."""


class BadRequest(ServeError):
    """The request is malformed or does not fit the model (shape, datatype, size, JSON...)."""


class ModelNotFound(ServeError):
    """No model (or no version of it) by that name in the repository."""


class ModelUnavailable(ServeError):
    """The model exists but is not loaded (its load failed, or the server is stopping)."""


class ServerNotReady(ServeError):
    """The server is not ready to take inference requests."""


class PayloadTooLarge(ServeError):
    """The request body (compressed or decompressed) is over the configured limit."""


class ServerBusy(ServeError):
    """The request fits the memory budgets, but not what the requests in flight leave free."""


class InferenceFailed(ServeError):
    """onnxruntime failed to run a valid request, or produced outputs the config contradicts."""


_STATUS: dict[type[ServeError], int] = {
    BadRequest: 400,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    InferenceFailed: 500,
    ModelUnavailable: 503,
    ServerNotReady: 503,
    ServerBusy: 503,
}


def http_status(error: ServeError) -> int:
    """The HTTP status of ``error``: that of the nearest class in its MRO listed above."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500
