"""The per-model request decoder (:mod:`runtime.serve.decoder`): a request whose JSON header
was seen before decodes to exactly what the full decoder (:func:`codec.decode_request`, the
oracle) makes of it, values checked the same way, and only the values are read.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from normport.export import triton_config
from normport.runtime.serve import codec
from normport.runtime.serve.codec import InferRequest, decode_request
from normport.runtime.serve.decoder import MAX_HEADER_BYTES, MAX_PLANS, RequestDecoder
from normport.runtime.serve.errors import BadRequest
from normport.runtime.serve.spec import ModelSpec

_CONFIG = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] },
  { name: "flag" data_type: TYPE_BOOL dims: [ 2 ] },
  { name: "text" data_type: TYPE_STRING dims: [ 1 ] }
]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]
"""


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_config(triton_config.parse(_CONFIG), "1")


def _body(
    x: np.ndarray, flag: bytes, words: list[str], request_id: str | None = None
) -> tuple[bytes, int]:
    """A binary request for the three inputs (``flag``: the BOOL bytes as sent)."""
    text = b"".join(len(w.encode()).to_bytes(4, "little") + w.encode() for w in words)
    blobs = [x.astype("<f4").tobytes(), flag, text]
    shapes = [list(x.shape), [x.shape[0], 2], [x.shape[0], 1]]
    types = ["FP32", "BOOL", "BYTES"]
    doc: dict = {
        "inputs": [
            {"name": n, "shape": s, "datatype": t, "parameters": {"binary_data_size": len(b)}}
            for n, s, t, b in zip(("x", "flag", "text"), shapes, types, blobs, strict=True)
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc)
    return header + b"".join(blobs), len(header)


def _same(a: InferRequest, b: InferRequest) -> None:
    assert (a.id, a.batch_size, a.outputs) == (b.id, b.batch_size, b.outputs)
    assert list(a.inputs) == list(b.inputs)
    for name in a.inputs:
        x, y = a.inputs[name], b.inputs[name]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


def _raises(call) -> str:
    with pytest.raises(BadRequest) as info:
        call()
    return str(info.value)


def test_a_repeated_header_decodes_as_the_full_decoder_without_reading_it_again(
    spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    decoder = RequestDecoder(spec)
    loads = []
    real = codec.orjson.loads
    monkeypatch.setattr(codec.orjson, "loads", lambda b: loads.append(1) or real(b))
    for i in range(5):
        x = rng.standard_normal((2, 2, 3)).astype(np.float32)
        words = ["ab", "cd"] if i % 2 else ["é", "xy"]  # as many bytes: the same header
        body, n = _body(x, bytes([i % 2, 1, 0, 1]), words)
        got = decoder.decode(body, n)
        _same(got, decode_request(spec, body, n))
        assert np.array_equal(got.inputs["x"], x)
    # the full decoder read its header 5 times (the oracle calls); the decoder only once
    assert len(loads) == 5 + 1
    assert decoder.plans == 1


def test_values_are_still_checked_on_a_known_header(spec: ModelSpec) -> None:
    """NaN, a BOOL byte over 1 and non-UTF-8 BYTES, after the same header decoded fine: the
    same errors as the full decoder, and the plan is kept for the next good request."""
    decoder = RequestDecoder(spec)
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    good, n = _body(x, b"\x00\x01\x01\x00", ["ab", "cd"])
    decoder.decode(good, n)
    bad_x = x.copy()
    bad_x[1, 1, 2] = np.nan
    cases = [
        _body(bad_x, b"\x00\x01\x01\x00", ["ab", "cd"]),
        _body(x, b"\x00\x02\x01\x00", ["ab", "cd"]),
        (good[:-2] + b"\xff\xfe", n),
    ]
    for body, length in cases:
        assert decoder.plans == 1
        expected = _raises(lambda b=body, k=length: decode_request(spec, b, k))
        assert _raises(lambda b=body, k=length: decoder.decode(b, k)) == expected
    _same(decoder.decode(good, n), decode_request(spec, good, n))


def test_near_misses_take_the_full_decoder(spec: ModelSpec) -> None:
    """A known header with a body one byte longer or shorter, another id, a JSON body: decoded
    in full (the errors and results of decode_request), none of them matched to the plan."""
    decoder = RequestDecoder(spec)
    x = np.ones((2, 2, 3), np.float32)
    body, n = _body(x, b"\x01\x00\x00\x01", ["ab", "cd"])
    decoder.decode(body, n)
    for bad in (body + b"\x00", body[:-1]):
        expected = _raises(lambda b=bad: decode_request(spec, b, n))
        assert _raises(lambda b=bad: decoder.decode(b, n)) == expected
    other, m = _body(x, b"\x01\x00\x00\x01", ["ab", "cd"], request_id="r-7")
    _same(decoder.decode(other, m), decode_request(spec, other, m))
    assert decoder.decode(other, m).id == "r-7" and decoder.plans == 2
    json_body = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [1.5] * 6},
                {"name": "flag", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]},
                {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["w"]},
            ]
        }
    )
    _same(decoder.decode(json_body, None), decode_request(spec, json_body, None))
    assert decoder.plans == 2  # JSON values live in the header: nothing kept


def test_a_header_that_failed_is_never_kept(spec: ModelSpec) -> None:
    decoder = RequestDecoder(spec)
    x = np.zeros((2, 2, 3), np.float32)
    x[0, 0, 0] = np.inf
    body, n = _body(x, b"\x00\x00\x00\x00", ["a", "b"])
    for _ in range(2):
        assert "NaN or Inf" in _raises(lambda: decoder.decode(body, n))
    assert decoder.plans == 0


def test_the_plans_are_bounded_and_large_headers_are_not_kept(spec: ModelSpec) -> None:
    decoder = RequestDecoder(spec)
    x = np.ones((1, 2, 3), np.float32)
    for i in range(MAX_PLANS + 10):
        body, n = _body(x, b"\x00\x01", ["a"], request_id=str(i))
        _same(decoder.decode(body, n), decode_request(spec, body, n))
        assert decoder.plans == min(i + 1, MAX_PLANS)
    body, n = _body(x, b"\x00\x01", ["a"], request_id="i" * MAX_HEADER_BYTES)
    assert n > MAX_HEADER_BYTES
    _same(decoder.decode(body, n), decode_request(spec, body, n))
    assert decoder.plans == MAX_PLANS
