"""Triton model repository: layout, config.pbtxt vs the graph, round trip, runs, and the CLI."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from normport import export
from normport.export import triton_config
from normport.export.__main__ import main
from normport.export.repository import build_config, triton_type, write_model
from normport.models import zoo
from normport.runtime.serve.spec import ModelSpec
from tests.triton_schema import as_dict, parse_config, read_config

NAMES = ["cnn_gn", "seq_bn", "transformer_ln"]
ATOL = 1e-5
TRITON = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT64: "TYPE_INT64"}


@dataclass
class Exported:
    name: str
    net: nn.Module
    model: onnx.ModelProto
    folder: Path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("model_repository")
    out = {}
    for name in NAMES:
        spec = zoo.get(name)
        net = spec.build()
        model = export.to_onnx(
            net,
            spec.example_inputs(4),
            mode="eval",
            opset=23,
            dynamic=spec.dynamic_dims,
            input_names=spec.input_names,
            output_names=spec.output_names,
        )
        out[name] = Exported(name, net, model, write_model(root, name, model))
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def tiny_model(inputs: list, outputs: list, node: onnx.NodeProto) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


# -- layout and config --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_layout(repo: dict[str, Exported], name: str) -> None:
    e = repo[name]
    assert e.folder == e.folder.parent / name
    files = sorted(p.relative_to(e.folder).as_posix() for p in e.folder.rglob("*") if p.is_file())
    assert files == ["1/model.onnx", "config.pbtxt"]  # no temporary files left behind
    onnx.checker.check_model(onnx.load(e.folder / "1" / "model.onnx"))


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_graph(repo: dict[str, Exported], name: str) -> None:
    e = repo[name]
    text = (e.folder / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text
    assert "dynamic_batching {" in text
    config = read_config(e.folder / "config.pbtxt")
    assert config["name"] == name
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] > 0
    batching = config["dynamic_batching"]
    assert batching is not None
    assert batching["max_queue_delay_microseconds"] >= 0
    assert all(0 < s <= config["max_batch_size"] for s in batching["preferred_batch_size"])
    for key, values in (("inputs", e.model.graph.input), ("outputs", e.model.graph.output)):
        assert [t["name"] for t in config[key]] == [v.name for v in values]
        for tensor, value in zip(config[key], values, strict=True):
            dims = graph_dims(value)
            assert dims[0] == "batch"
            assert tensor["data_type"] == TRITON[value.type.tensor_type.elem_type]
            assert tensor["dims"] == [d if isinstance(d, int) else -1 for d in dims[1:]]
            assert tensor["reshape"] is None


@pytest.mark.parametrize("name", NAMES)
def test_read_config_round_trip(repo: dict[str, Exported], name: str) -> None:
    e = repo[name]
    assert read_config(e.folder) == as_dict(build_config(name, e.model))
    assert as_dict(triton_config.read(e.folder)) == read_config(e.folder)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_size", [1, 5])
def test_model_runs_like_pytorch(repo: dict[str, Exported], name: str, batch_size: int) -> None:
    e = repo[name]
    spec = zoo.get(name)
    inputs = spec.example_inputs(batch_size, seed=batch_size)
    with torch.no_grad():
        expected = e.net(*inputs)
    sess = session(e.folder / "1" / "model.onnx")
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs, strict=True)}
    (actual,) = sess.run(list(spec.output_names), feeds)
    assert actual.shape[0] == batch_size
    np.testing.assert_allclose(actual, expected.numpy(), atol=ATOL, rtol=ATOL)


# -- write_model options and errors -------------------------------------------------------------


def test_no_batching_lists_full_shapes_and_reshapes_scalars(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    model = tiny_model([x], [y], helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0))
    config = read_config(write_model(tmp_path, "sum", model, max_batch_size=0))
    assert config["max_batch_size"] == 0
    assert config["dynamic_batching"] is None
    assert config["inputs"] == [
        {"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 3], "reshape": None}
    ]
    assert config["outputs"] == [
        {"name": "y", "data_type": "TYPE_FP32", "dims": [1], "reshape": []}
    ]


def test_batch_only_tensor_gets_reshape(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])
    model = tiny_model([x], [y], helper.make_node("Identity", ["x"], ["y"]))
    config = read_config(
        write_model(
            tmp_path,
            "id",
            model,
            max_batch_size=8,
            preferred_batch_sizes=[8, 2, 2],
            max_queue_delay_microseconds=0,
        )
    )
    assert config["inputs"][0] == {
        "name": "x",
        "data_type": "TYPE_INT64",
        "dims": [1],
        "reshape": [],
    }
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [2, 8],
        "max_queue_delay_microseconds": 0,
    }


@pytest.mark.parametrize(
    ("y_shape", "match"),
    [
        ([16], r"output 'y': axis 0 is 16, expected 'batch'"),
        (["seq"], r"output 'y': axis 0 is seq, expected 'batch'"),
        ([], r"output 'y': axis 0 is none \(a scalar\)"),
    ],
)
def test_axis0_must_be_the_batch_dim(tmp_path: Path, y_shape: list, match: str) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    model = tiny_model([x], [y], helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0))
    with pytest.raises(ValueError, match=match):
        write_model(tmp_path, "m", model)
    assert not (tmp_path / "m").exists()  # nothing written for an invalid config


def test_unmapped_dtype_raises(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("z", TensorProto.COMPLEX64, ["batch", 2])
    y = helper.make_tensor_value_info("w", TensorProto.COMPLEX64, ["batch", 2])
    model = tiny_model([x], [y], helper.make_node("Identity", ["z"], ["w"]))
    with pytest.raises(
        ValueError, match=r"tensor 'z' has ONNX element type COMPLEX64, which has no Triton TYPE_\*"
    ):
        write_model(tmp_path, "c", model)
    with pytest.raises(ValueError, match=r"FLOAT8E4M3FN"):
        triton_type(TensorProto.FLOAT8E4M3FN)


@pytest.mark.parametrize(
    ("elem_type", "expected"),
    [
        (TensorProto.FLOAT, "TYPE_FP32"),
        (TensorProto.FLOAT16, "TYPE_FP16"),
        (TensorProto.BFLOAT16, "TYPE_BF16"),
        (TensorProto.DOUBLE, "TYPE_FP64"),
        (TensorProto.INT64, "TYPE_INT64"),
        (TensorProto.INT32, "TYPE_INT32"),
        (TensorProto.INT8, "TYPE_INT8"),
        (TensorProto.UINT8, "TYPE_UINT8"),
        (TensorProto.BOOL, "TYPE_BOOL"),
    ],
)
def test_triton_types(elem_type: int, expected: str) -> None:
    assert triton_type(elem_type) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "a/b"}, r"plain folder name"),
        ({"name": ".."}, r"plain folder name"),
        ({"max_batch_size": -1}, r"max_batch_size must be an int >= 0"),
        ({"preferred_batch_sizes": [128]}, r"preferred batch sizes must be ints in \[1, 64\]"),
        ({"max_batch_size": 0, "preferred_batch_sizes": [4]}, r"needs max_batch_size > 0"),
    ],
)
def test_bad_options(repo: dict[str, Exported], kwargs: dict, match: str) -> None:
    kwargs = {"name": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        build_config(kwargs.pop("name"), repo["cnn_gn"].model, **kwargs)


# -- parser: normport's reading against Triton's schema -----------------------------------------

GOOD = """
# comment
name: "m"   # trailing comment
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "a \\"q\\"" data_type: TYPE_INT64 dims: [ -1 ] } ]
output { name: "b" data_type: TYPE_FP32 dims: 2 dims: 3 }
output: { name: "c" data_type: TYPE_BOOL dims: [1] reshape: { shape: [ ] } };
dynamic_batching { }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def test_parse_reads_what_tritons_schema_reads() -> None:
    expected = {
        "name": "m",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "inputs": [{"name": 'a "q"', "data_type": "TYPE_INT64", "dims": [-1], "reshape": None}],
        "outputs": [
            {"name": "b", "data_type": "TYPE_FP32", "dims": [2, 3], "reshape": None},
            {"name": "c", "data_type": "TYPE_BOOL", "dims": [1], "reshape": []},
        ],
        "dynamic_batching": {"preferred_batch_size": [], "max_queue_delay_microseconds": 0},
        "parameters": {},
    }
    assert parse_config(GOOD) == expected  # the oracle: tritonclient's compiled schema
    assert as_dict(triton_config.parse(GOOD)) == expected


def test_written_text_is_what_triton_reads(repo: dict[str, Exported]) -> None:
    """The writer's text through Triton's schema gives the message it was written from."""
    config = build_config("cnn_gn", repo["cnn_gn"].model, preferred_batch_sizes=[2, 8])
    config.parameters["execution_mode"].string_value = "1"
    text = triton_config.to_text(config, comment="line one\nline two")
    assert text.startswith(triton_config.HEADER + "\n# line one\n# line two\n")
    assert parse_config(text) == as_dict(config)
    assert parse_config(text)["dynamic_batching"]["preferred_batch_size"] == [2, 8]


HEAD = 'name: "m"\nplatform: "p"\n'
TENSORS = 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\noutput [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
SECRET = "hunter2"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (HEAD + "max_batch_size: 1.5\n", r"line 3, column 17: expected an integer$"),
        (HEAD + 'input [\n  { name: "x"\n', r"line 4, column 11: expected '\}'$"),
        (HEAD + 'input [ { name: "x" dims: [ 1 2 ] } ]\n', r"line 3, column 31: expected ',' or '\]' in a list$"),
        (HEAD + "max_batch_size 8\n", r"line 3, column 16: expected ':' after a field name$"),
        (HEAD + "}\n", r"line 3, column 1: expected a field name or identifier$"),
        (HEAD + 'name: "unterminated\n', r"line 3, column 7: a quoted string has no closing quote$"),
        (HEAD + TENSORS + 'max_batch_size: "8"\n', r"line 5, column 17: expected an integer$"),
        (HEAD + TENSORS + "max_batch_size: 1\nmax_batch_size: 2\n", r"line 6, column 17: field 'max_batch_size' repeated in ModelConfig$"),
        (HEAD + 'input [ { name: "x" data_type: TYPE_FLOAT dims: [ 1 ] } ]\n', r"line 3, column 32: unknown value for DataType \(allowed: TYPE_INVALID, TYPE_BOOL, "),
        (HEAD + '\n\noutput [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] color: 3 } ]\n', r"line 5, column 55: unknown field in ModelOutput \(allowed: name, data_type, dims, reshape, "),
        (HEAD + TENSORS + "dynamic_batching { preferred_batch_size: [ TYPE_FP32 ] }\n", r"line 5, column 44: expected an integer$"),
        (HEAD + "max_batch_size: 99999999999\n", r"line 3, column 17: integer out of range for its field$"),
    ],
)  # fmt: skip
def test_read_rejects_malformed_text(tmp_path: Path, text: str, match: str) -> None:
    """Every refusal is Triton's too (its schema refuses the same text), says where, and never
    quotes the text."""
    with pytest.raises(Exception):  # noqa: B017 (text_format.ParseError: Triton refuses it)
        parse_config(text)
    path = tmp_path / "config.pbtxt"
    path.write_text(text.replace("TYPE_FLOAT", f"TYPE_{SECRET}").replace("color", SECRET))
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + match) as info:
        triton_config.read(path)
    assert SECRET not in str(info.value)


def test_the_server_needs_tensors_and_names() -> None:
    """Triton's schema leaves every field optional; the server refuses what Triton refuses."""
    cases = {
        HEAD
        + 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n': "the config has no 'output'",
        HEAD
        + "input [ { data_type: TYPE_FP32 dims: [ 1 ] } ]\n"
        + TENSORS[TENSORS.index("output") :]: "an input of the config has no name",
        HEAD
        + 'input [ { name: "x" dims: [ 1 ] } ]\n'
        + TENSORS[TENSORS.index("output") :]: "input 'x' has no data_type",
        HEAD
        + 'input [ { name: "x" data_type: TYPE_FP32 } ]\n'
        + TENSORS[TENSORS.index("output") :]: "input 'x': dims must not be empty",
    }
    for text, message in cases.items():
        parse_config(text)  # valid ModelConfig text for Triton's schema
        with pytest.raises(ValueError, match=re.escape(message)):
            ModelSpec.from_config(triton_config.parse(text), "1")
    assert ModelSpec.from_config(triton_config.parse(HEAD + TENSORS), "1").inputs[0].dims == (1,)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_exports_one_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "seq_bn", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    progress = captured.err.splitlines()
    assert progress[0] == "[1/1] seq_bn: exporting ..."
    assert re.fullmatch(
        r"\[1/1\] seq_bn: ok \(\d+ nodes, [\d.]+ KB, [\d.]+ s\); dynamic batching", progress[1]
    )
    header, rule, row = captured.out.strip().splitlines()
    assert set(rule.replace(" ", "")) == {"-"}
    assert header.split() == [
        "name",
        "mode",
        "opset",
        "dtype",
        "nodes",
        "norm",
        "ops",
        "size",
        "KB",
        "seconds",
        "batching",
        "status",
    ]
    assert row.split()[:4] == ["seq_bn", "eval", "23", "float32"]
    assert row.split()[-1] == "ok"
    assert read_config(tmp_path / "seq_bn")["name"] == "seq_bn"
    assert (tmp_path / "seq_bn" / "1" / "model.onnx").is_file()


def test_cli_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--model", "seq_bn", "--model", "resnet999", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model(s) 'resnet999'; known: cnn_bn, cnn_gn" in err
    assert not list(tmp_path.iterdir())  # rejected before exporting anything


def test_cli_goes_on_after_an_export_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export.to_onnx

    def flaky(module, *args, **kwargs):
        if type(module).__name__ != "SequenceBN":
            raise ValueError("boom")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(export, "to_onnx", flaky)
    assert main(["--model", "cnn_gn", "--model", "seq_bn", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "error: cnn_gn: ValueError: boom" in captured.err
    rows = captured.out.strip().splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["cnn_gn", "seq_bn"]
    assert rows[0].split()[-1] == "FAILED"
    assert rows[1].split()[-1] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq_bn"]
