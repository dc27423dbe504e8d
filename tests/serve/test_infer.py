"""Inference through tritonclient (sync and aio) and raw HTTP: every result equals a direct
onnxruntime run of the same input, bit for bit."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import ml_dtypes
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio

from tests.serve.repo import DATATYPES

RNG = np.random.default_rng(7)

# zoo model -> (input name, per-sample shape, dtype, output names)
ZOO_INPUTS = {
    "cnn_bn": ("image", (3, 32, 32), np.float32),
    "seq_bn": ("sequence", (16, 8), np.float32),
    "transformer_ln": ("tokens", (12,), np.int64),
}
# (input binary, output binary)
PROTOCOLS = {"json": (False, False), "binary": (True, True), "binary_in_json_out": (True, False),
             "json_in_binary_out": (False, True)}  # fmt: skip


def zoo_input(model: str, batch: int) -> np.ndarray:
    _, shape, dtype = ZOO_INPUTS[model]
    if dtype == np.int64:
        return RNG.integers(0, 64, (batch, *shape), dtype=np.int64)
    return RNG.standard_normal((batch, *shape)).astype(dtype)


def infer_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values covering the range of ``datatype`` (non-ASCII and empty BYTES included)."""
    dtype = DATATYPES[datatype][1]
    if datatype == "BYTES":
        words = ["héllo", "", "日本語", "a b", "\x00zero"]
        return np.array(
            [words[i % len(words)] for i in range(int(np.prod(shape)))], dtype=object
        ).reshape(shape)
    if datatype == "BOOL":
        return RNG.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (RNG.standard_normal(shape) * 100).astype(dtype)


def as_reference(datatype: str, array: np.ndarray) -> np.ndarray:
    """What the server's answer must equal: BYTES come back as UTF-8 bytes (binary)."""
    if datatype == "BYTES":
        return np.array([s.encode() for s in array.reshape(-1)], dtype=object).reshape(array.shape)
    return array


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ZOO_INPUTS)
def test_zoo_models_match_onnxruntime(client, reference, model: str, protocol: str) -> None:
    binary_in, binary_out = PROTOCOLS[protocol]
    name = ZOO_INPUTS[model][0]
    x = zoo_input(model, 3)
    datatype = "FP32" if x.dtype == np.float32 else "INT64"
    expected = reference(model, {name: x})
    outputs = [triton.InferRequestedOutput(o, binary_data=binary_out) for o in expected]
    result = client.infer(model, [infer_input(name, x, datatype, binary_in)], outputs=outputs)
    for output, want in expected.items():
        got = result.as_numpy(output)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want), f"{model} {output} differs from onnxruntime"


def test_default_call_gets_binary_outputs(client, reference) -> None:
    x = zoo_input("cnn_bn", 2)
    result = client.infer("cnn_bn", [infer_input("image", x, "FP32", True)], request_id="req-42")
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == "cnn_bn" and response["model_version"] == "1"
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    assert np.array_equal(result.as_numpy("logits"), reference("cnn_bn", {"image": x})["logits"])


# BF16 travels as binary only (tritonclient refuses BF16 JSON; the server answers 400).
@pytest.mark.parametrize(
    ("datatype", "binary"),
    [(d, b) for d in DATATYPES for b in (True, False) if b or d != "BF16"],
    ids=lambda v: v if isinstance(v, str) else ("binary" if v else "json"),
)
def test_every_datatype_round_trips(client, reference, datatype: str, binary: bool) -> None:
    x = sample(datatype, (4, 3))
    model = f"t_{datatype.lower()}"
    expected = reference(model, {"x": x})["y"]
    result = client.infer(
        model,
        [infer_input("x", x, datatype, binary)],
        outputs=[triton.InferRequestedOutput("y", binary_data=binary)],
    )
    got = result.as_numpy("y")
    want = as_reference(datatype, expected) if binary else expected
    assert got.shape == want.shape
    if datatype == "BYTES" and not binary:  # JSON strings come back as str
        want = expected
    assert got.dtype == want.dtype or datatype == "BYTES"
    assert np.array_equal(got.view(np.uint16) if datatype == "BF16" else got,
                          want.view(np.uint16) if datatype == "BF16" else want)  # fmt: skip


def test_bf16_values_survive_bit_for_bit(client) -> None:
    bits = np.array([[0x3F80, 0x8001, 0x7F7F], [0x0001, 0xC2F7, 0x0000]], np.uint16)
    x = bits.view(ml_dtypes.bfloat16)
    result = client.infer("t_bf16", [infer_input("x", x, "BF16", True)])
    assert np.array_equal(result.as_numpy("y").view(np.uint16), bits)
    # JSON output of BF16: exact float values
    result = client.infer(
        "t_bf16",
        [infer_input("x", x, "BF16", True)],
        outputs=[triton.InferRequestedOutput("y", binary_data=False)],
    )
    assert result.get_response()["outputs"][0]["data"][0] == 1.0


def test_output_subset_and_mixed_encodings(client, reference) -> None:
    a, b = RNG.standard_normal((2, 2, 4)).astype(np.float32)
    inputs = [infer_input("a", a, "FP32", True), infer_input("b", b, "FP32", False)]
    expected = reference("pair", {"a": a, "b": b})
    only = client.infer("pair", inputs, outputs=[triton.InferRequestedOutput("diff")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["diff"]
    assert only.as_numpy("sum") is None
    assert np.array_equal(only.as_numpy("diff"), expected["diff"])
    mixed = client.infer(
        "pair",
        inputs,
        outputs=[
            triton.InferRequestedOutput("sum", binary_data=False),
            triton.InferRequestedOutput("diff", binary_data=True),
        ],
    )
    entries = {o["name"]: o for o in mixed.get_response()["outputs"]}
    assert "data" in entries["sum"] and "binary_data_size" in entries["diff"]["parameters"]
    for name in ("sum", "diff"):
        assert np.array_equal(mixed.as_numpy(name), expected[name])


@pytest.mark.parametrize("version", ["1", "2", ""])
def test_versions_serve_their_own_model(client, version: str) -> None:
    x = np.zeros((1, 2), np.float32)
    result = client.infer("versioned", [infer_input("x", x, "FP32", True)], model_version=version)
    served = version or "2"  # no version: the newest
    assert result.get_response()["model_version"] == served
    assert np.array_equal(result.as_numpy("y"), x + float(served))


def test_reshape_and_no_batching_models(client, reference) -> None:
    x = RNG.standard_normal((3, 1)).astype(np.float32)  # client shape [batch] + dims [1]
    result = client.infer("scalar", [infer_input("x", x, "FP32", True)])
    assert result.as_numpy("y").shape == (3, 1)
    assert np.array_equal(result.as_numpy("y")[:, 0], reference("scalar", {"x": x[:, 0]})["y"])
    x = RNG.standard_normal((2, 3)).astype(np.float32)  # max_batch_size 0: the full shape
    result = client.infer("nobatch", [infer_input("x", x, "FP32", False)])
    assert np.array_equal(result.as_numpy("y"), reference("nobatch", {"x": x})["y"])


def test_external_data_inside_the_model_folder_loads(client, reference) -> None:
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    result = client.infer("external_ok", [infer_input("x", x, "FP32", True)])
    assert np.array_equal(result.as_numpy("y"), x + np.float32(0.5))


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, reference, algorithm: str) -> None:
    x = zoo_input("seq_bn", 2)
    result = client.infer(
        "seq_bn",
        [infer_input("sequence", x, "FP32", True)],
        request_compression_algorithm=algorithm,
    )
    assert np.array_equal(result.as_numpy("output"), reference("seq_bn", {"sequence": x})["output"])


@pytest.mark.parametrize(
    "encode",
    [gzip.compress, zlib.compress, lambda b: zlib.compress(b)[2:-4]],
    ids=["gzip", "deflate-zlib", "deflate-raw"],
)
def test_compressed_raw_http(http, reference, encode) -> None:
    x = zoo_input("seq_bn", 1)
    body = orjson.dumps({"inputs": [{"name": "sequence", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.tolist()}]})  # fmt: skip
    encoding = "gzip" if encode is gzip.compress else "deflate"
    r = http.post("/v2/models/seq_bn/infer", content=encode(body),
                  headers={"Content-Encoding": encoding})  # fmt: skip
    assert r.status_code == 200, r.text
    got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, 16, 4)
    assert np.array_equal(got, reference("seq_bn", {"sequence": x})["output"])


def test_plain_curl_style_json(http, reference) -> None:
    """No Content-Type, nested data, request id echoed, a JSON response."""
    x = zoo_input("transformer_ln", 2)
    body = {"id": "abc", "inputs": [{"name": "tokens", "shape": [2, 12], "datatype": "INT64",
                                     "data": x.tolist()}]}  # fmt: skip
    r = http.post("/v2/models/transformer_ln/infer", content=orjson.dumps(body))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["id"] == "abc"
    got = np.array(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
    assert np.array_equal(got, reference("transformer_ln", {"tokens": x})["logits"])


def test_aio_client(server, reference) -> None:
    async def run() -> None:
        async with triton_aio.InferenceServerClient(server.url) as aio:
            assert await aio.is_server_live() and await aio.is_model_ready("cnn_bn")
            assert (await aio.get_model_metadata("cnn_bn"))["name"] == "cnn_bn"
            for binary in (True, False):
                x = zoo_input("cnn_bn", 2)
                tensor = triton_aio.InferInput("image", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary)
                out = [triton_aio.InferRequestedOutput("logits", binary_data=binary)]
                result = await aio.infer("cnn_bn", [tensor], outputs=out)
                want = reference("cnn_bn", {"image": x})["logits"]
                assert np.array_equal(result.as_numpy("logits"), want)
            stats = await aio.get_inference_statistics("cnn_bn")
            assert stats["model_stats"][0]["inference_count"] > 0

    asyncio.run(asyncio.wait_for(run(), 60))
