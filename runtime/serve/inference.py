"""One infer request, end to end: admission, body, decode, batcher, encode, statistics and
metrics.

Memory admission (:mod:`runtime.serve.admission`) happens twice, each time before the memory is
used: before the body is read, the server's budget must hold the body's expected size times its
decoding factor (``Content-Length``, else the body limit); once the request is decoded, its full
estimate (:meth:`runtime.serve.memory.MemoryProfile.request_bytes`) replaces that, held against
the model's budget and the server's until the response is built.
"""

from __future__ import annotations

import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from normport.runtime.serve.admission import Budget, Hold
from normport.runtime.serve.body import expected_size, header_length, read_body
from normport.runtime.serve.codec import InferRequest, encode_response
from normport.runtime.serve.memory import (
    BINARY_INPUT_FACTOR,
    JSON_INPUT_FACTOR,
    MemoryProfile,
    sample_elements,
)
from normport.runtime.serve.repository import ModelVersion

__all__ = ["infer"]

_JSON = "application/json"
_BINARY = "application/octet-stream"


async def infer(
    model: ModelVersion, request: Request, max_body_bytes: int, server_budget: Budget
) -> Response:
    """Answer ``request`` with ``model`` (READY); every failure is counted, then re-raised.

    A client that disconnects before its body is complete is not a failure: nothing is counted
    (statistics nor metrics) and :class:`ClientDisconnect` goes to the app's quiet handler."""
    assert model.spec is not None and model.batcher is not None  # READY
    assert model.stats is not None and model.metrics is not None
    assert model.profile is not None and model.budget is not None
    assert model.decoder is not None
    start = time.perf_counter_ns()
    hold = Hold.empty()
    try:
        length = header_length(request)
        expected = expected_size(request, max_body_bytes)
        factor = JSON_INPUT_FACTOR if length is None else BINARY_INPUT_FACTOR
        hold.take(server_budget, expected * factor, model.name, f"a body of {expected} bytes")
        body = await read_body(request, max_body_bytes)
        parsed = model.decoder.decode(body, length)
        need, run_bytes, detail = _estimate(model.profile, model, parsed, len(body), length)
        model.budget.check_limit(need, model.name, detail)
        server_budget.check_limit(need, model.name, detail)
        hold.release()  # the body's share is part of ``need``
        hold.take(model.budget, need, model.name, detail)
        hold.take(server_budget, need, model.name, detail)
        result = await model.batcher.infer(parsed.inputs, parsed.batch_size, run_bytes)
        content, json_length = encode_response(model.spec, parsed, result.outputs)
    except ClientDisconnect:
        raise
    except BaseException:
        duration = time.perf_counter_ns() - start
        model.stats.record_failure(duration)
        model.metrics.record_failure(duration)
        raise
    finally:
        hold.release()
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


def _estimate(
    profile: MemoryProfile,
    model: ModelVersion,
    parsed: InferRequest,
    body: int,
    header_length: int | None,
) -> tuple[int, int, str]:
    """The request's estimated bytes, its run's share, and how messages describe it."""
    assert model.spec is not None
    shapes = [a.shape for a in parsed.inputs.values()]
    elements = sample_elements(shapes, model.spec.batched)
    batch = parsed.batch_size
    need = profile.request_bytes(
        body=body,
        json_input=header_length is None,
        batch=batch,
        elements=elements,
        json_output=any(not o.binary for o in parsed.outputs),
    )
    detail = f"a request of {batch} sample(s) of {elements} input elements each"
    return need, profile.run_bytes(batch, elements), detail
