"""One infer request, end to end: body, decode, batcher, encode, statistics and metrics."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from runtime.serve.body import header_length, read_body
from runtime.serve.codec import decode_request, encode_response
from runtime.serve.repository import ModelVersion

__all__ = ["infer"]

_JSON = "application/json"
_BINARY = "application/octet-stream"


async def infer(model: ModelVersion, request: Request, max_body_bytes: int) -> Response:
    """Answer ``request`` with ``model`` (READY); every failure is counted, then re-raised."""
    assert model.spec is not None and model.batcher is not None  # READY
    assert model.stats is not None and model.metrics is not None
    start = time.perf_counter_ns()
    try:
        body = await read_body(request, max_body_bytes)
        parsed = decode_request(model.spec, body, header_length(request))
        result = await model.batcher.infer(parsed.inputs, parsed.batch_size)
        content, json_length = encode_response(model.spec, parsed, result.outputs)
    except BaseException:
        duration = time.perf_counter_ns() - start
        model.stats.record_failure(duration)
        model.metrics.record_failure(duration)
        raise
    duration = time.perf_counter_ns() - start
    model.stats.record_success(result, parsed.batch_size, duration)
    model.metrics.record_success(result, parsed.batch_size, duration)
    if json_length is None:
        return Response(content, media_type=_JSON)
    return Response(
        content,
        media_type=_BINARY,
        headers={"Inference-Header-Content-Length": str(json_length)},
    )
