"""Every error case: its status and a message naming the model and the tensor, always as
``{"error": "..."}``, and the server still answering afterwards."""

from __future__ import annotations

import asyncio
import gzip
import re
import struct
from dataclasses import dataclass, field

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from normport.runtime.serve import create_app


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: bytes | None
    status: int
    message: str  # regex
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


def js(doc) -> bytes:
    return orjson.dumps(doc)


def tensor(name: str, shape: list[int], datatype: str, data=None, size: int | None = None) -> dict:
    entry = {"name": name, "shape": shape, "datatype": datatype}
    if data is not None:
        entry["data"] = data
    if size is not None:
        entry["parameters"] = {"binary_data_size": size}
    return entry


def framed(doc: dict, *blobs: bytes, header: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = js(doc)
    length = len(head) if header is None else header
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(length)}


def case(id_: str, model: str, body, status: int, message: str, **kw) -> Case:
    headers = {}
    if isinstance(body, tuple):
        body, headers = body
    elif isinstance(body, dict | list):
        body = js(body)
    return Case(
        id_,
        f"/v2/models/{model}/infer",
        body,
        status,
        message,
        headers | kw.pop("headers", {}),
        **kw,
    )


SEQ = [[0.5] * 8] * 16  # one seq_bn sample
F32_6 = np.arange(6, dtype=np.float32).tobytes()
NAN = np.array([0, np.nan, 0], np.float32).tobytes()
INF16 = np.array([0, np.inf, 0], np.float16).tobytes()
BYTES_BAD_UTF8 = struct.pack("<I", 2) + b"\xff\xfe" + (struct.pack("<I", 0) * 2)
BYTES_SHORT = struct.pack("<I", 20) + b"abc" + bytes(8)  # 15 bytes, element 0 claims 20

CASES = [
    # -- routing and models
    case("unknown-model", "nope", {"inputs": []}, 404, r"^unknown model 'nope'$"),
    case("unknown-version", "cnn_bn/versions/7", {"inputs": []}, 404, r"model 'cnn_bn' has no version '7'"),
    case("unavailable-model", "broken_truncated", {"inputs": []}, 503, r"model 'broken_truncated' is not available: ValueError: corrupt or truncated"),
    Case("unknown-route", "/v2/nothing/here", None, 404, r"^Not Found$", method="GET"),
    Case("wrong-method", "/v2/models/cnn_bn/infer", None, 405, r"^Method Not Allowed$", method="GET"),
    Case("wrong-method-health", "/v2/health/live", b"", 405, r"^Method Not Allowed$"),
    Case("traversal-is-just-a-name", "/v2/models/..%2F..%2Fetc/infer", b"{}", 404, r"^Not Found$|^unknown model '\.\./\.\./etc'$"),
    # -- JSON structure
    case("malformed-json", "seq_bn", b'{"inputs": [', 400, r"model 'seq_bn': malformed request JSON"),
    case("nan-literal-json", "seq_bn", b'{"inputs": [NaN]}', 400, r"malformed request JSON"),
    case("json-not-object", "seq_bn", b"[1, 2]", 400, r"model 'seq_bn': the request must be a JSON object"),
    case("no-inputs", "seq_bn", {"outputs": []}, 400, r"'inputs' must be a non-empty list"),
    case("id-not-string", "seq_bn", {"id": 5, "inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ)]}, 400, r"'id' must be a string"),
    case("input-without-name", "seq_bn", {"inputs": [{"shape": [1]}]}, 400, r"every input needs a string 'name'"),
    case("unknown-input", "seq_bn", {"inputs": [tensor("seq", [1, 16, 8], "FP32", SEQ)]}, 400, r"model 'seq_bn' has no input 'seq' \(inputs: sequence\)"),
    case("missing-input", "pair", {"inputs": [tensor("a", [1, 4], "FP32", [1, 2, 3, 4])]}, 400, r"model 'pair': missing input\(s\) 'b'"),
    case("duplicate-input", "seq_bn", {"inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ)] * 2}, 400, r"model 'seq_bn', input 'sequence': given twice"),
    case("wrong-datatype", "seq_bn", {"inputs": [tensor("sequence", [1, 16, 8], "INT64", SEQ)]}, 400, r"model 'seq_bn', input 'sequence': datatype 'INT64', expected 'FP32'"),
    case("wrong-rank", "seq_bn", {"inputs": [tensor("sequence", [16, 8], "FP32", SEQ)]}, 400, r"input 'sequence': shape \[16, 8\] does not match \[-1, -1, 8\]"),
    case("wrong-fixed-dim", "cnn_bn", {"inputs": [tensor("image", [1, 4, 2, 2], "FP32", [0.0] * 16)]}, 400, r"model 'cnn_bn', input 'image': shape \[1, 4, 2, 2\] does not match \[-1, 3, -1, -1\]"),
    case("negative-dim", "seq_bn", {"inputs": [tensor("sequence", [1, -16, 8], "FP32", SEQ)]}, 400, r"'shape' must be a list of ints >= 0"),
    case("too-few-elements", "seq_bn", {"inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ[:-1])]}, 400, r"model 'seq_bn', input 'sequence': 120 elements, the shape needs 128"),
    case("data-not-list", "seq_bn", {"inputs": [tensor("sequence", [1, 1, 8], "FP32", "abc")]}, 400, r"input 'sequence': 'data' must be a \(flat or nested\) list"),
    case("strings-for-floats", "t_fp32", {"inputs": [tensor("x", [1, 3], "FP32", ["a", "b", "c"])]}, 400, r"model 't_fp32', input 'x': FP32 elements must be numbers"),
    case("null-for-float", "t_fp32", {"inputs": [tensor("x", [1, 3], "FP32", [1.0, None, 2.0])]}, 400, r"model 't_fp32', input 'x': .*numbers"),
    case("float-for-int", "t_int64", {"inputs": [tensor("x", [1, 3], "INT64", [1, 2.5, 3])]}, 400, r"model 't_int64', input 'x': INT64 elements must be integers"),
    case("int8-out-of-range", "t_int8", {"inputs": [tensor("x", [1, 3], "INT8", [1, 300, 3])]}, 400, r"model 't_int8', input 'x': a value is out of range for INT8"),
    case("uint64-negative", "t_uint64", {"inputs": [tensor("x", [1, 3], "UINT64", [1, -1, 2**64 - 1])]}, 400, r"input 'x': a value is out of range for UINT64"),
    case("int-for-bool", "t_bool", {"inputs": [tensor("x", [1, 3], "BOOL", [1, 0, 1])]}, 400, r"model 't_bool', input 'x': BOOL elements must be true or false"),
    case("number-for-bytes", "t_bytes", {"inputs": [tensor("x", [1, 3], "BYTES", ["a", 1, "c"])]}, 400, r"model 't_bytes', input 'x': BYTES elements in JSON must be strings"),
    case("bf16-json", "t_bf16", {"inputs": [tensor("x", [1, 3], "BF16", [1.0, 2.0, 3.0])]}, 400, r"model 't_bf16', input 'x': BF16 data must be sent as binary"),
    case("inf-json-overflow", "t_fp16", {"inputs": [tensor("x", [1, 3], "FP16", [1.0, 1e6, 3.0])]}, 400, r"model 't_fp16', input 'x': NaN or Inf values are not accepted"),
    case("unknown-output", "seq_bn", {"inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ)], "outputs": [{"name": "logits"}]}, 400, r"model 'seq_bn' has no output 'logits' \(outputs: output\)"),
    case("duplicate-output", "seq_bn", {"inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ)], "outputs": [{"name": "output"}] * 2}, 400, r"model 'seq_bn', output 'output': requested twice"),
    case("classification", "seq_bn", {"inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ)], "outputs": [{"name": "output", "parameters": {"classification": 3}}]}, 400, r"output 'output': parameter 'classification' is not supported"),
    case("shared-memory", "seq_bn", {"inputs": [{**tensor("sequence", [1, 16, 8], "FP32"), "parameters": {"shared_memory_region": "r"}}]}, 400, r"input 'sequence': parameter 'shared_memory_region' is not supported"),
    case("sequence-batching", "seq_bn", {"parameters": {"sequence_id": 3}, "inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ)]}, 400, r"model 'seq_bn': parameter 'sequence_id' is not supported"),
    case("bad-binary-output-flag", "seq_bn", {"parameters": {"binary_data_output": "yes"}, "inputs": [tensor("sequence", [1, 16, 8], "FP32", SEQ)]}, 400, r"parameter 'binary_data_output' must be true or false"),
    # -- batch
    case("batch-over-max", "t_fp32", {"inputs": [tensor("x", [9, 3], "FP32", [0.0] * 27)]}, 400, r"model 't_fp32': batch size 9 is not in \[1, max_batch_size 8\]"),
    case("batch-zero", "t_fp32", {"inputs": [tensor("x", [0, 3], "FP32", [])]}, 400, r"batch size 0 is not in"),
    case("batch-disagrees", "pair", {"inputs": [tensor("a", [1, 4], "FP32", [0.0] * 4), tensor("b", [2, 4], "FP32", [0.0] * 8)]}, 400, r"model 'pair': inputs disagree on the batch size"),
    case("value-out-of-vocab", "transformer_ln", {"inputs": [tensor("tokens", [1, 3], "INT64", [1, 2, 100])]}, 400, r"model 'transformer_ln:1' refused the request: .*out of data bounds"),
    # -- binary framing
    case("binary-size-mismatch", "t_fp32", framed({"inputs": [tensor("x", [2, 3], "FP32", size=20)]}, F32_6[:20]), 400, r"model 't_fp32', input 'x': 20 bytes of binary data, expected 6 elements x 4 bytes = 24"),
    case("binary-past-end", "t_fp32", framed({"inputs": [tensor("x", [2, 3], "FP32", size=24)]}, F32_6[:8]), 400, r"input 'x': binary_data_size 24 runs past the end of the body \(8 bytes left"),
    case("binary-unclaimed-bytes", "t_fp32", framed({"inputs": [tensor("x", [2, 3], "FP32", size=24)]}, F32_6, b"xx"), 400, r"2 bytes after the JSON header are not claimed"),
    case("binary-and-data", "t_fp32", framed({"inputs": [tensor("x", [1, 3], "FP32", [1, 2, 3], size=12)]}, F32_6[:12]), 400, r"input 'x': has both 'data' and binary_data_size"),
    case("binary-size-negative", "t_fp32", framed({"inputs": [tensor("x", [1, 3], "FP32", size=-1)]}), 400, r"binary_data_size must be an int >= 0"),
    case("no-data", "t_fp32", {"inputs": [tensor("x", [1, 3], "FP32")]}, 400, r"input 'x': has neither 'data' nor binary_data_size"),
    case("nan-binary", "t_fp32", framed({"inputs": [tensor("x", [1, 3], "FP32", size=12)]}, NAN), 400, r"model 't_fp32', input 'x': NaN or Inf values are not accepted"),
    case("inf-binary-fp16", "t_fp16", framed({"inputs": [tensor("x", [1, 3], "FP16", size=6)]}, INF16), 400, r"model 't_fp16', input 'x': NaN or Inf"),
    case("nan-binary-bf16", "t_bf16", framed({"inputs": [tensor("x", [1, 3], "BF16", size=6)]}, np.array([0, 0x7FC0, 0], np.uint16).tobytes()), 400, r"model 't_bf16', input 'x': NaN or Inf"),
    case("bool-not-0-1", "t_bool", framed({"inputs": [tensor("x", [1, 3], "BOOL", size=3)]}, b"\x00\x02\x01"), 400, r"model 't_bool', input 'x': BOOL bytes must be 0 or 1"),
    case("bytes-not-utf8", "t_bytes", framed({"inputs": [tensor("x", [1, 3], "BYTES", size=len(BYTES_BAD_UTF8))]}, BYTES_BAD_UTF8), 400, r"model 't_bytes', input 'x': BYTES element 0 is not UTF-8"),
    case("bytes-shape-too-big", "t_bytes", framed({"inputs": [tensor("x", [10**12, 3], "BYTES", size=8)]}, b"\0" * 8), 400, r"input 'x': 8 bytes cannot hold 3000000000000 BYTES elements"),
    case("huge-shape-binary", "t_fp32", framed({"inputs": [tensor("x", [10**15, 3], "FP32", size=12)]}, F32_6[:12]), 400, r"12 bytes of binary data, expected 3000000000000000 elements"),
    case("long-unknown-name", "t_fp32", {"inputs": [tensor("n" * 5000, [1, 3], "FP32", [1, 2, 3])]}, 400, r"has no input 'n{100}\.\.\.' \(inputs: x\)$"),
    case("bytes-truncated", "t_bytes", framed({"inputs": [tensor("x", [1, 3], "BYTES", size=len(BYTES_SHORT))]}, BYTES_SHORT), 400, r"input 'x': BYTES element 0 runs past its binary_data_size"),
    case("header-length-not-int", "t_fp32", (js({"inputs": []}), {"Inference-Header-Content-Length": "12x"}), 400, r"Inference-Header-Content-Length must be an integer >= 0, got '12x'"),
    case("header-length-past-body", "t_fp32", framed({"inputs": [tensor("x", [1, 3], "FP32", size=12)]}, header=10_000), 400, r"Inference-Header-Content-Length 10000 is not in \[1, \d+\]"),
    case("header-length-too-short", "t_fp32", framed({"inputs": [tensor("x", [1, 3], "FP32", size=12)]}, F32_6[:12], header=20), 400, r"malformed request JSON"),
    case("header-length-zero", "t_fp32", framed({"inputs": []}, header=0), 400, r"raw binary requests are not supported"),
    # -- compression
    case("unknown-encoding", "seq_bn", (b"xx", {"Content-Encoding": "br"}), 400, r"unsupported Content-Encoding 'br'"),
    case("corrupt-gzip", "seq_bn", (b"not gzip at all", {"Content-Encoding": "gzip"}), 400, r"corrupt gzip request body"),
    case("truncated-gzip", "seq_bn", (gzip.compress(b'{"inputs": []}' * 50)[:-12], {"Content-Encoding": "gzip"}), 400, r"gzip request body is truncated"),
    # -- other endpoints
    Case("index-bad-json", "/v2/repository/index", b"{", 400, r"malformed repository index request JSON"),
    Case("index-bad-ready", "/v2/repository/index", b'{"ready": 1}', 400, r'must be \{"ready": true\|false\}'),
    Case("metadata-unknown", "/v2/models/nope", None, 404, r"unknown model 'nope'", method="GET"),
    Case("config-unavailable", "/v2/models/broken_config/config", None, 503, r"model 'broken_config' is not available: ValueError", method="GET"),
    Case("ready-unavailable", "/v2/models/broken_mismatch/versions/1/ready", None, 503, r"config says TYPE_INT64", method="GET"),
]  # fmt: skip


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_error(http, c: Case) -> None:
    r = http.request(c.method, c.path, content=c.body, headers=c.headers)
    assert r.status_code == c.status, r.text
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert list(doc) == ["error"] and isinstance(doc["error"], str)
    assert re.search(c.message, doc["error"]), doc["error"]


def test_405_names_the_allowed_method(http) -> None:
    assert http.get("/v2/models/cnn_bn/infer").headers["allow"] == "POST"


def test_errors_are_counted_and_the_server_keeps_serving(http, client) -> None:
    before = client.get_inference_statistics("t_fp32")["model_stats"][0]["inference_stats"]
    http.post("/v2/models/t_fp32/infer", content=b"{")
    after = client.get_inference_statistics("t_fp32")["model_stats"][0]["inference_stats"]
    assert after["fail"]["count"] == before["fail"]["count"] + 1
    assert client.is_server_live() and client.is_model_ready("t_fp32")


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda: ("nope", [triton.InferInput("x", [1, 3], "FP32")]), "404", r"unknown model"),
        (lambda: ("t_fp32", []), "400", r"'inputs' must be a non-empty list"),
    ],
    ids=["unknown-model", "no-inputs"],
)
def test_tritonclient_surfaces_the_message(client, make, status: str, message: str) -> None:
    model, inputs = make()
    for tensor in inputs:
        tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException, match=message) as e:
        client.infer(model, inputs)
    assert e.value.status() == status


# -- body size limits: an in-process app with a 4 KiB limit ---------------------------------

LIMIT = 4096


@pytest.fixture(scope="module")
def small(repo_root):
    """POST to an in-process app (httpx's ASGI transport) with a 4 KiB body limit."""
    app = create_app(repo_root, threads=1, max_body_bytes=LIMIT)

    def post(path: str, content: bytes, headers: dict | None = None) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                return await c.post(path, content=content, headers=headers or {})

        return asyncio.run(send())

    post.app = app  # type: ignore[attr-defined]
    return post


def _ok_body(n: int) -> bytes:
    data = [0.0] * 3 * n
    return js({"inputs": [tensor("x", [n, 3], "FP32", data)]})


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b" " * (LIMIT + 1), {}, r"over the limit of 4096 bytes"),
        (gzip.compress(b" " * (LIMIT * 50)), {"Content-Encoding": "gzip"}, r"once decompressed is over the limit of 4096 bytes"),
    ],
    ids=["raw", "gzip-bomb"],
)  # fmt: skip
def test_body_limit_413(small, body: bytes, headers: dict, message: str) -> None:
    r = small("/v2/models/t_fp32/infer", body, headers)
    assert r.status_code == 413 and re.search(message, r.json()["error"])
    assert small("/v2/models/t_fp32/infer", _ok_body(1)).status_code == 200


def test_body_limit_413_over_a_socket(server, http) -> None:
    """The real server's 64 MiB default: a 65 MiB body is refused from its Content-Length."""
    r = http.post("/v2/models/t_fp32/infer", content=b" " * (65 * 1024 * 1024))
    assert r.status_code == 413 and "over the limit of 67108864 bytes" in r.json()["error"]
    assert http.get("/v2/health/live").status_code == 200


# -- the infer route before the router: the same answers as Starlette's router --------------


def _router_only(app):
    """The same routes and error handlers, without the infer route in front (the oracle)."""
    from starlette.applications import Starlette

    oracle = Starlette(routes=app.routes, exception_handlers=app.exception_handlers)
    oracle.router.redirect_slashes = app.router.redirect_slashes
    return oracle


@pytest.mark.parametrize(
    ("method", "path", "content", "root_path"),
    [
        ("POST", "/v2/models/t_fp32/infer", _ok_body(2), ""),
        ("POST", "/v2/models/t_fp32/versions/1/infer", _ok_body(1), ""),
        ("POST", "/v2/models/t_fp32/versions/9/infer", _ok_body(1), ""),
        ("POST", "/v2/models/nope/infer", _ok_body(1), ""),
        ("POST", "/v2/models/broken_mismatch/infer", _ok_body(1), ""),
        ("POST", "/v2/models/t_fp32/infer", b"{", ""),
        ("POST", "/v2/models//infer", _ok_body(1), ""),
        ("POST", "/v2/models/t_fp32/infer/", _ok_body(1), ""),
        ("POST", "/v2/models/a/b/infer", _ok_body(1), ""),
        ("POST", "/v2/models/t_fp32/versions//infer", _ok_body(1), ""),
        ("GET", "/v2/models/t_fp32/infer", b"", ""),
        ("PUT", "/v2/models/t_fp32/infer", _ok_body(1), ""),
        ("POST", "/api/v2/models/t_fp32/infer", _ok_body(1), "/api"),
        ("POST", "/apiv2/models/t_fp32/infer", _ok_body(1), "/api"),
    ],
)  # fmt: skip
def test_the_infer_route_answers_as_the_router_does(small, method, path, content, root_path):
    """Status, body and content type through the app (the infer route before the router)
    and through Starlette's router alone, on the same loaded models."""
    app = small.app

    async def call(target) -> httpx.Response:
        transport = httpx.ASGITransport(app=target, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            return await c.request(method, path, content=content)

    fast, oracle = asyncio.run(call(app)), asyncio.run(call(_router_only(app)))
    assert fast.status_code == oracle.status_code, (fast.text, oracle.text)
    assert fast.headers["content-type"] == oracle.headers["content-type"]
    assert fast.content == oracle.content
