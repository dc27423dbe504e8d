"""Requests that used to reach numpy or onnxruntime and fail there (HTTP 500) are refused up
front with a 4xx naming the model and the tensor or header, and the server keeps answering
good requests exactly as a direct onnxruntime run does.

- 65 tokens to the token models, whose position table has 64 rows: refused by the bound that
  export recorded (``normport.max_shape.tokens`` in their config);
- a zero dim next to huge ones (no elements, but numpy sizes strides from the other dims);
- a dim over the int64 range of ONNX dims;
- length headers of 4,301 digits (``int()`` refuses more than 4,300).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from normport.models import zoo
from tests.triton_schema import read_config

BIG = 2**62  # with a zero dim: 0 elements
TOKENS_65 = [[1] * 65]
LONG = "1" * 4301  # one digit more than int() takes


def body(name: str, shape: list[int], datatype: str, data: list) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                     "data": data}]})  # fmt: skip


@dataclass(frozen=True)
class Abuse:
    id: str
    model: str
    content: bytes
    status: int
    message: str  # regex; always names the model and the tensor or header
    names: str  # the tensor or header the message must name
    headers: dict[str, str] = field(default_factory=dict)


ABUSES = [
    Abuse("65-tokens-transformer_ln", "transformer_ln", body("tokens", [1, 65], "INT64", TOKENS_65), 400,
          r"^model 'transformer_ln', input 'tokens': axis 1 is 65, the model takes at most 64$", "input 'tokens'"),
    Abuse("65-tokens-llm_rms", "llm_rms", body("tokens", [1, 65], "INT64", TOKENS_65), 400,
          r"^model 'llm_rms', input 'tokens': axis 1 is 65, the model takes at most 64$", "input 'tokens'"),
    Abuse("zero-dim-next-to-2**62", "cnn_bn", body("image", [1, 3, 0, BIG], "FP32", []), 400,
          r"^model 'cnn_bn', input 'image': shape \[1, 3, 0, 4611686018427387904\] is too large",
          "input 'image'"),
    Abuse("2**62-next-to-zero-dim", "cnn_bn", body("image", [1, 3, BIG, 0], "FP32", []), 400,
          r"^model 'cnn_bn', input 'image': shape \[1, 3, 4611686018427387904, 0\] is too large",
          "input 'image'"),
    Abuse("zero-dim-huge-batch", "cnn_bn", body("image", [BIG, 3, 0, 8], "FP32", []), 400,
          r"^model 'cnn_bn', input 'image': shape \[4611686018427387904, 3, 0, 8\] is too large",
          "input 'image'"),
    Abuse("dim-over-int64", "cnn_bn", body("image", [1, 3, 0, 2**63], "FP32", []), 400,
          r"^model 'cnn_bn', input 'image': axis 3 is 9223372036854775808, over the largest ONNX "
          r"dim", "input 'image'"),
    Abuse("header-length-4301-digits", "t_fp32", body("x", [1, 3], "FP32", [1, 2, 3]), 400,
          r"^model 't_fp32': Inference-Header-Content-Length has 4301 digits",
          "Inference-Header-Content-Length", {"Inference-Header-Content-Length": LONG}),
    Abuse("header-length-4301-zeros", "t_fp32", body("x", [1, 3], "FP32", [1, 2, 3]), 400,
          r"^model 't_fp32': Inference-Header-Content-Length 0 is not in \[1, \d+\]",
          "Inference-Header-Content-Length", {"Inference-Header-Content-Length": "0" * 4301}),
]  # fmt: skip

RNG = np.random.default_rng(11)
# model -> (input, datatype, a good input: token models at their longest, 64)
GOOD = {
    "transformer_ln": ("tokens", "INT64", lambda: RNG.integers(0, 64, (2, 64), dtype=np.int64)),
    "llm_rms": ("tokens", "INT64", lambda: RNG.integers(0, 64, (2, 64), dtype=np.int64)),
    "cnn_bn": ("image", "FP32", lambda: RNG.standard_normal((2, 3, 9, 7)).astype(np.float32)),
    "t_fp32": ("x", "FP32", lambda: RNG.standard_normal((2, 3)).astype(np.float32)),
}


def assert_serves_like_onnxruntime(client, reference, model: str) -> None:
    name, datatype, make = GOOD[model]
    x = make()
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=True)
    expected = reference(model, {name: x})
    outputs = [triton.InferRequestedOutput(o, binary_data=True) for o in expected]
    result = client.infer(model, [tensor], outputs=outputs)
    for output, want in expected.items():
        got = result.as_numpy(output)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), f"{model} {output} differs from onnxruntime"


@pytest.mark.parametrize("abuse", ABUSES, ids=[a.id for a in ABUSES])
def test_refused_with_4xx_and_the_server_keeps_serving(http, client, reference, abuse) -> None:
    r = http.post(f"/v2/models/{abuse.model}/infer", content=abuse.content, headers=abuse.headers)
    assert r.status_code == abuse.status, r.text
    error = r.json()["error"]
    assert f"model '{abuse.model}'" in error and abuse.names in error
    assert re.search(abuse.message, error), error
    assert_serves_like_onnxruntime(client, reference, abuse.model)


def _raw_post(host: str, port: int, path: str, headers: dict[str, str], content: bytes) -> bytes:
    """One HTTP/1.1 request with headers exactly as given (httpx would rewrite the length)."""
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode() + content)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_zero_padded_lengths_are_read_as_their_value(server, client, reference) -> None:
    """``Content-Length`` and ``Inference-Header-Content-Length`` with 4,300 leading zeros are
    valid decimal numbers: the request is answered like any other."""
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    header = orjson.dumps(
        {
            "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    )  # fmt: skip
    content = header + x.tobytes()
    headers = {
        "Content-Length": "0" * 4300 + str(len(content)),
        "Inference-Header-Content-Length": "0" * 4300 + str(len(header)),
    }
    raw = _raw_post(server.host, server.port, "/v2/models/t_fp32/infer", headers, content)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    json_length = int(fields[b"inference-header-content-length"])
    (entry,) = orjson.loads(payload[:json_length])["outputs"]
    got = np.frombuffer(payload[json_length:], np.float32).reshape(entry["shape"])
    assert got.tobytes() == reference("t_fp32", {"x": x})["y"].tobytes()
    assert_serves_like_onnxruntime(client, reference, "t_fp32")


@pytest.mark.parametrize("model", ["transformer_ln", "llm_rms", "cnn_bn", "seq_bn"])
def test_zoo_configs_carry_the_graphs_bounds(repo_root: Path, model: str) -> None:
    """The token models' position table (read off the module) bounds ``seq_len``; the others
    take any size."""
    module = zoo.get(model).build()
    pos = getattr(module, "pos", None)
    expected = {} if pos is None else {"normport.max_shape.tokens": f"[{pos.num_embeddings}]"}
    assert read_config(repo_root / model)["parameters"] == expected


def test_the_model_config_endpoint_shows_the_bounds(client) -> None:
    """Triton's JSON form of ``parameters``: ``{key: {"string_value": value}}``."""
    config = client.get_model_config("transformer_ln")
    assert config["parameters"] == {"normport.max_shape.tokens": {"string_value": "[64]"}}
    assert client.get_model_config("cnn_bn")["parameters"] == {}  # printed empty, as Triton does
