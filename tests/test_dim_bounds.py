"""Dim bounds: found on the traced graph, kept in the metadata, written as config ``parameters``,
read back, validated by the server's spec and enforced by its codec.

The bounds are checked against the models themselves: PyTorch runs the module at the bound
and fails one past it, and so does onnxruntime on the exported graph.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from normport import export
from normport.export import triton_config
from normport.export._bounds_format import BOUNDS_KEY, read_dim_bounds
from normport.export.repository import build_config, write_model
from normport.runtime.serve.codec import decode_request
from normport.runtime.serve.errors import BadRequest
from normport.runtime.serve.repository import UNAVAILABLE, Repository
from normport.runtime.serve.spec import ModelSpec
from tests.serve.repo import MAX_BATCH, identity
from tests.triton_schema import as_dict, parse_config

# -- export: the bounds come from the model ----------------------------------------------------


class PositionTable(nn.Module):
    """A learned position table sliced to the sequence length: ``seq_len <= rows``."""

    def __init__(self, rows: int = 10, dim: int = 4) -> None:
        super().__init__()
        self.pos = nn.Embedding(rows, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.pos.weight[: x.shape[1]])


class NoTable(nn.Module):
    """Any sequence length."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.lin(x))


class ValidConv(nn.Module):
    """A 5x5 convolution without padding: ``height, width >= 5``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


SEQ = {"x": {0: "batch", 1: "seq_len"}}
IMAGE = {"x": {0: "batch", 2: "height", 3: "width"}}


@dataclass(frozen=True)
class BoundCase:
    id: str
    build: type[nn.Module]
    shape: tuple[int, ...]  # the example input
    dynamic: dict
    expected: object  # module -> {dim: {"min"/"max": n}}, read off the module
    axes: dict[str, int]  # dim name -> its axis in x


CASES = [
    BoundCase("position-table", PositionTable, (2, 6, 4), SEQ,
              lambda m: {"seq_len": {"max": m.pos.num_embeddings}}, {"seq_len": 1}),
    BoundCase("no-table", NoTable, (2, 6, 4), SEQ, lambda m: {}, {}),
    BoundCase("valid-conv", ValidConv, (2, 3, 9, 9), IMAGE,
              lambda m: {"height": {"min": m.conv.kernel_size[0]},
                         "width": {"min": m.conv.kernel_size[1]}},
              {"height": 2, "width": 3}),
]  # fmt: skip


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[nn.Module, onnx.ModelProto]]:
    out = {}
    torch.manual_seed(0)
    for c in CASES:
        module = c.build().eval()
        model = export.to_onnx(
            module, torch.randn(c.shape), mode="eval", dynamic=c.dynamic, input_names=["x"]
        )
        out[c.id] = (module, model)
    return out


def _shape(c: BoundCase, dim: str, size: int) -> tuple[int, ...]:
    shape = list(c.shape)
    shape[c.axes[dim]] = size
    return tuple(shape)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_export_records_the_models_bounds(exported, c: BoundCase) -> None:
    module, model = exported[c.id]
    assert read_dim_bounds(model) == c.expected(module)
    raw = next(p.value for p in model.metadata_props if p.key == BOUNDS_KEY)
    assert json.loads(raw) == c.expected(module)


@pytest.mark.parametrize("c", [c for c in CASES if c.axes], ids=[c.id for c in CASES if c.axes])
def test_bounds_are_where_the_model_and_the_graph_stop(exported, c: BoundCase) -> None:
    """At the bound PyTorch and onnxruntime both run; one past it both fail."""
    module, model = exported[c.id]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for dim, bound in read_dim_bounds(model).items():
        ((end, size),) = bound.items()
        past = size + 1 if end == "max" else size - 1
        x = torch.randn(_shape(c, dim, size))
        with torch.no_grad():
            expected = module(x).numpy()
        (got,) = session.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        with pytest.raises((RuntimeError, IndexError)), torch.no_grad():
            module(torch.randn(_shape(c, dim, past)))
        with pytest.raises(Exception, match=r"(?i)fail|invalid"):
            session.run(None, {"x": np.zeros(_shape(c, dim, past), np.float32)})


@pytest.mark.parametrize(
    ("case_id", "parameters"),
    [
        ("position-table", {"normport.max_shape.x": "[10, -1]"}),
        ("no-table", {}),
        ("valid-conv", {"normport.min_shape.x": "[-1, 5, 5]"}),
    ],
)
def test_build_config_writes_the_bounds_as_parameters(exported, case_id, parameters) -> None:
    _, model = exported[case_id]
    config = build_config("m", model)
    assert parse_config(triton_config.to_text(config))["parameters"] == parameters


# -- config parameters: format, parse ----------------------------------------------------------


def _model(bounds: dict | None, shape: list) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    model.ir_version = 10
    if bounds is not None:
        helper.set_model_props(model, {BOUNDS_KEY: json.dumps(bounds)})
    return model


def test_parameters_round_trip_and_keep_tritons_own_keys() -> None:
    bounds = {"seq_len": {"min": 3, "max": 64}, "width": {"max": 7}}
    config = build_config("m", _model(bounds, ["batch", "seq_len", 8, "width"]))
    config.parameters["execution_mode"].string_value = 'say "hi"\n'  # Triton's own key: kept
    text = triton_config.to_text(config)
    read = parse_config(text)  # Triton's schema reads what normport wrote
    assert read["parameters"] == {
        "normport.max_shape.x": "[64, -1, 7]",
        "normport.min_shape.x": "[3, -1, -1]",
        "execution_mode": 'say "hi"\n',
    }
    assert read == as_dict(triton_config.parse(text))


def test_no_batching_bounds_every_axis() -> None:
    config = build_config("m", _model({"batch": {"max": 4}}, ["batch", 3]), max_batch_size=0)
    assert triton_config.parameters(config) == {"normport.max_shape.x": "[4, -1]"}


@pytest.mark.parametrize(
    ("bounds", "match"),
    [
        ({"batch": {"max": 4}}, r"at most 4 on its batch dim 'batch': use max_batch_size <= 4"),
        ({"batch": {"min": 3}}, r"at least 3 on its batch dim 'batch'.*max_batch_size=0"),
    ],
)
def test_a_batch_bound_the_batcher_could_break_is_refused(bounds: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_config("m", _model(bounds, ["batch", 3]), max_batch_size=8)


def test_bad_bounds_metadata_is_refused() -> None:
    model = _model(None, ["batch", 3])
    helper.set_model_props(model, {BOUNDS_KEY: '{"batch": {"max": "4"}}'})
    with pytest.raises(ValueError, match=r"metadata_props\['normport.dim_bounds'\] must map"):
        build_config("m", model)


HEAD = 'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
IO = (
    'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]\n'
    'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]\n'
)


def test_hand_written_parameters_in_both_spellings() -> None:
    blocks = (
        'parameters { key: "normport.max_shape.x" value { string_value: "[5, -1]" } }\n'
        'parameters: [ { key: "execution_mode" value: { string_value: "1" } } ]\n'
    )
    text = HEAD + IO + blocks
    expected = {"normport.max_shape.x": "[5, -1]", "execution_mode": "1"}
    assert parse_config(text)["parameters"] == expected
    assert triton_config.parameters(triton_config.parse(text)) == expected


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ('{ key: "normport.max_size.x" value { string_value: "[5, -1]" } }',
         r"^unknown normport parameters key \(allowed: normport.max_shape.<input>"),
        ('{ key: "normport.max_shape.z" value { string_value: "[5, -1]" } }',
         r"^unknown normport parameters key"),
        ('{ key: "k" value { int_value: 3 } }',
         r"^line 7, column 31: unknown field in ModelParameter \(allowed: string_value\)$"),
        ('{ key: "k" value: "v" }', r"^line 7, column 30: expected '\{'$"),
    ],
    ids=["unknown-normport-key", "unknown-input", "int-value", "value-not-block"],
)  # fmt: skip
def test_bad_parameters_are_refused(block: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        triton_config.parse(HEAD + IO + "\nparameters " + block + "\n")


def test_parameters_that_triton_accepts_are_accepted() -> None:
    """Near misses of the refusals above: a repeated key (the last wins, as in Triton) and a
    key without a value (an empty string) parse; the oracle is Triton's schema."""
    text = (
        HEAD
        + IO
        + (
            'parameters { key: "k" value { string_value: "a" } }\n'
            'parameters { key: "k" value { string_value: "b" } }\n'
            'parameters { key: "e" }\n'
        )
    )
    assert triton_config.parameters(triton_config.parse(text)) == {"k": "b", "e": ""}
    assert parse_config(text)["parameters"] == {"k": "b", "e": ""}


# -- the server's spec: validation and enforcement ----------------------------------------------


def _spec(parameters: dict[str, str], dims: list[int] | None = None) -> ModelSpec:
    text = HEAD + IO.replace("[ -1, 3 ]", f"[ {', '.join(map(str, dims or [-1, 3]))} ]", 1)
    config = triton_config.parse(text)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return ModelSpec.from_config(config, "1")


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"normport.max_shape.x": "[5"}, r"parameter normport.max_shape.x: not JSON"),
        ({"normport.max_shape.x": "[5]"}, r"normport.max_shape.x: expected a JSON list of 2 int"),
        ({"normport.max_shape.x": "[5, 1.5]"}, r"normport.max_shape.x: expected a JSON list"),
        ({"normport.max_shape.x": "[true, -1]"}, r"normport.max_shape.x: expected a JSON list"),
        ({"normport.min_shape.x": "[-2, -1]"}, r"normport.min_shape.x: expected a JSON list"),
        ({"normport.max_shape.x": f"[{2**63}, -1]"}, r"normport.max_shape.x: expected"),
        ({"normport.max_shape.x": "[" + "9" * 5000 + ", -1]"}, r"normport.max_shape.x: not JSON"),
        ({"normport.max_shape.x": "[-1, 4]"}, r"normport.max_shape.x: entry 1 is 4, but that dim is fixed at 3"),
        ({"normport.min_shape.x": "[6, -1]", "normport.max_shape.x": "[5, -1]"},
         r"normport.min_shape.x and normport.max_shape.x: entry 0 has minimum 6 above maximum 5"),
    ],
    ids=["not-json", "rank", "float", "bool", "below-minus-one", "over-int64", "huge-number",
         "contradicts-fixed-dim", "min-above-max"],
)  # fmt: skip
def test_spec_refuses_bad_bounds_naming_the_parameter(parameters: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _spec(parameters)


def test_spec_takes_the_bounds() -> None:
    spec = _spec({"normport.min_shape.x": "[2, -1]", "normport.max_shape.x": "[5, 3]"})
    (x,) = spec.inputs
    assert (x.min_dims, x.max_dims) == ((2, -1), (5, 3))
    assert _spec({}).inputs[0].max_dims is None


def _request(shape: list[int]) -> bytes:
    data = [0.5] * int(np.prod(shape))
    return json.dumps(
        {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]}
    ).encode()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1, 6, 3], r"^model 'm', input 'x': axis 1 is 6, the model takes at most 5$"),
        ([1, 1, 3], r"^model 'm', input 'x': axis 1 is 1, the model takes at least 2$"),
        ([1, 5, 3], None),
        ([1, 2, 3], None),
    ],
)
def test_codec_enforces_the_bounds(shape: list[int], message: str | None) -> None:
    spec = _spec({"normport.min_shape.x": "[2, -1]", "normport.max_shape.x": "[5, -1]"})
    if message is None:
        assert decode_request(spec, _request(shape), None).inputs["x"].shape == tuple(shape)
    else:
        with pytest.raises(BadRequest, match=message):
            decode_request(spec, _request(shape), None)


def test_a_bad_bound_makes_the_model_unavailable(tmp_path: Path) -> None:
    write_model(tmp_path, "good", identity(TensorProto.FLOAT), max_batch_size=MAX_BATCH)
    folder = write_model(tmp_path, "bad", identity(TensorProto.FLOAT), max_batch_size=MAX_BATCH)
    config = folder / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters { key: "normport.max_shape.x" value: { string_value: "[4]" } }\n'
    )
    repo = Repository(tmp_path, threads=1)
    bad = repo.models["bad"]["1"]
    assert bad.state == UNAVAILABLE
    assert re.search(r"parameter normport.max_shape.x: entry 0 is 4, but that dim is fixed at 3",
                     bad.reason)  # fmt: skip
    assert repo.models["good"]["1"].ready
