"""One model's request decoder: :func:`runtime.serve.codec.decode_request`, remembering what
the JSON headers of binary requests decide.

A client of the binary tensor extension sends the same JSON header with every request of a
kind (names, shapes, datatypes, ``binary_data_size``, the outputs wanted); only the bytes after
it change.  Checking that header against the model is most of the decoding: 10-20 us a request
where reading the values takes 2-6 us (seq_bn, transformer_ln, cnn_bn at batch 1).  So the
:class:`~runtime.serve.codec.Plan` of a header that decoded without error is kept, keyed by the
header's exact bytes, and a request whose header is byte-for-byte one of them, with as many
binary bytes after it, only has its values read and checked (NaN/Inf, BOOL bytes, BYTES
elements), with the same errors.  The same bytes make the same plan: the header is all the
checks read, and the model's spec does not change while it is loaded.

Anything else (a JSON body, a header over :data:`MAX_HEADER_BYTES`, a new header, another body
length) is decoded in full, as before.  At most :data:`MAX_PLANS` headers are kept per model,
the oldest dropped first: a client that varies its header (an ``id`` per request) costs a dict
lookup and nothing else.
"""

from __future__ import annotations

from normport.runtime.serve.codec import InferRequest, Plan, decode_with_plan
from normport.runtime.serve.spec import ModelSpec

__all__ = ["MAX_HEADER_BYTES", "MAX_PLANS", "RequestDecoder"]

MAX_HEADER_BYTES = 4096
MAX_PLANS = 64


class RequestDecoder:
    """Decodes ``spec``'s infer requests; on the event loop's thread only (not locked)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._plans: dict[bytes, Plan] = {}

    def decode(self, body: bytes, header_length: int | None) -> InferRequest:
        """:func:`runtime.serve.codec.decode_request` of ``body`` (module docstring).

        Raises:
            BadRequest: as :func:`~runtime.serve.codec.decode_request`.
        """
        key = None
        if header_length is not None and 0 < header_length <= min(len(body), MAX_HEADER_BYTES):
            view = memoryview(body)
            key = bytes(view[:header_length])
            plan = self._plans.get(key)
            if plan is not None and plan.binary_bytes == len(body) - header_length:
                return plan.apply(self.spec, view[header_length:])
        request, plan = decode_with_plan(self.spec, body, header_length)
        if key is not None and plan is not None:
            if len(self._plans) >= MAX_PLANS and key not in self._plans:
                del self._plans[next(iter(self._plans))]  # the oldest
            self._plans[key] = plan
        return request

    @property
    def plans(self) -> int:
        """How many headers are kept."""
        return len(self._plans)
