"""export._opset: opset-18 graphs brought to 13-28, per rewrite: structure, numbers, refusals."""

from __future__ import annotations

import ast
import functools
import pathlib
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, checker, helper, numpy_helper, shape_inference
from onnxruntime.capi.onnxruntime_pybind11_state import Fail
from torch import nn

from normport import export
from normport.export._opset import OpsetError, convert
from tests.onnx_helpers import close, default_opset, session, top_level_ops

DOWN = [13, 14, 15, 16, 17]
FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _checked(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    converted = convert(model, target)
    assert default_opset(converted) == target
    inferred = shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
    checker.check_model(inferred, full_check=True)
    return converted


def _run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def _split(shape: list, axis: int, n: int) -> onnx.ModelProto:
    outs = [f"y{i}" for i in range(n)]
    return _model(
        [helper.make_node("Split", ["x"], outs, name="split", axis=axis, num_outputs=n)],
        [helper.make_tensor_value_info("x", FLOAT, shape)],
        [helper.make_tensor_value_info(o, FLOAT, None) for o in outs],
    )


def _split_sizes(model: onnx.ModelProto) -> list[int]:
    (split,) = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(split.input) == 2 and [a.name for a in split.attribute] == ["axis"]
    (const,) = [n for n in model.graph.node if n.output[0] == split.input[1]]
    return numpy_helper.to_array(const.attribute[0].t).tolist()


# (id, x shape, axis, num_outputs, sizes Split-18 cuts): static dims give a constant.
STATIC_SPLITS = [
    ("even", [2, 12, 3], 1, 3, [4, 4, 4]),
    ("uneven", [2, 10, 3], 1, 4, [3, 3, 3, 1]),
    ("negative_axis", [2, 3, 7], -1, 2, [4, 3]),
    ("one_output", [5, 2], 0, 1, [5]),
]


@pytest.mark.parametrize("target", DOWN)
@pytest.mark.parametrize(
    ("shape", "axis", "n", "sizes"),
    [c[1:] for c in STATIC_SPLITS],
    ids=[c[0] for c in STATIC_SPLITS],
)
def test_split_num_outputs_static_becomes_constant_sizes(shape, axis, n, sizes, target):
    model = _split(shape, axis, n)
    converted = _checked(model, target)
    assert top_level_ops(converted) == ["Constant", "Split"]
    assert _split_sizes(converted) == sizes
    x = np.random.default_rng(target).standard_normal(shape).astype(np.float32)
    for got, want in zip(_run(converted, x=x), _run(model, x=x), strict=True):
        np.testing.assert_array_equal(got, want)


# The dim is only known at run time: the sizes are computed in the graph.
DYNAMIC_OPS = [
    "Shape", "Constant", "Gather", "Constant", "Add", "Constant", "Div", "Mul", "Sub",
    "Concat", "Split",
]  # fmt: skip


# (id, axis, num_outputs, dims to run, dims onnxruntime refuses at 18: the last size < 0).
DYNAMIC_SPLITS = [
    ("axis0", 0, 3, [3, 5, 7, 9, 10, 13], []),
    ("negative_axis", -2, 4, [4, 7, 10, 13], [5]),
    ("one_output", 0, 1, [1, 4], []),
]


@pytest.mark.parametrize("target", DOWN)
@pytest.mark.parametrize(
    ("axis", "n", "dims", "refused"),
    [c[1:] for c in DYNAMIC_SPLITS],
    ids=[c[0] for c in DYNAMIC_SPLITS],
)
def test_split_num_outputs_dynamic_computes_sizes(axis, n, dims, refused, target):
    model = _split(["n", 3], axis, n)
    converted = _checked(model, target)
    assert top_level_ops(converted) == DYNAMIC_OPS
    (split,) = [node for node in converted.graph.node if node.op_type == "Split"]
    assert [a.name for a in split.attribute] == ["axis"] and len(split.input) == 2
    for dim in dims:
        x = np.arange(dim * 3, dtype=np.float32).reshape(dim, 3)
        got, want = _run(converted, x=x), _run(model, x=x)
        assert [g.shape for g in got] == [w.shape for w in want], dim
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    for dim in refused:  # the same refusal as the opset-18 graph, not some other split
        x = np.zeros((dim, 3), np.float32)
        for m in (model, converted):
            with pytest.raises(Fail, match=r"negative final split|'split' input.*>= 0"):
                _run(m, x=x)


def test_split_with_explicit_sizes_keeps_its_input():
    sizes = numpy_helper.from_array(np.array([1, 2], np.int64), "sizes")
    model = _model(
        [helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="split", axis=1)],
        [helper.make_tensor_value_info("x", FLOAT, ["n", 3])],
        [helper.make_tensor_value_info(o, FLOAT, None) for o in "ab"],
        [sizes],
    )
    converted = _checked(model, 13)
    assert top_level_ops(converted) == ["Split"]
    assert list(converted.graph.node[0].input) == ["x", "sizes"]


def test_split_with_a_negative_last_chunk_is_refused():
    with pytest.raises(
        OpsetError,
        match=r"opset 13 cannot be met: node 'split' \(Split\) splits a dim of 5 into 4 outputs "
        r"of 2: the last would have size -1 .*; "
        r"onnx's version converter: No Adapter From Version \$18 for Split",
    ):
        convert(_split([5, 2], 0, 4), 13)


class _Chunks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = torch.chunk(x, 3, dim=-1)  # 7 -> 3, 3, 1: Split-18 num_outputs=3
        return a * 2 + b - c.mean(-1, keepdim=True)


def test_traced_chunk_matches_pytorch_below_18():
    module, x = _Chunks().eval(), torch.randn(4, 5, 7)
    models = export.to_onnx_opsets(module, x, mode="eval", opsets=DOWN)
    for target, model in models.items():
        (split,) = [n for n in model.graph.node if n.op_type == "Split"]
        assert len(split.input) == 2 and "num_outputs" not in {a.name for a in split.attribute}
        got = _run(model, x=x.numpy())[0]
        close(got, module(x).detach().numpy(), f"opset {target}")


def test_hardswish_becomes_hardsigmoid_times_x_at_13():
    model = _model(
        [helper.make_node("HardSwish", ["x"], ["y"], name="hs")],
        [helper.make_tensor_value_info("x", FLOAT, [2, 50])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 50])],
    )
    converted = _checked(model, 13)
    assert top_level_ops(converted) == ["HardSigmoid", "Mul"]
    x = np.linspace(-5, 5, 100, dtype=np.float32).reshape(2, 50)
    close(_run(converted, x=x)[0], _run(model, x=x)[0], "HardSwish", atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("target", DOWN)
def test_reduction_axes_go_through_the_converter_without_opset18_attributes(target):
    axes = helper.make_node(
        "Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64))
    )
    mean = helper.make_node(
        "ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=1, noop_with_empty_axes=0
    )
    model = _model(
        [axes, mean],
        [helper.make_tensor_value_info("x", FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 1])],
    )
    converted = _checked(model, target)
    assert top_level_ops(converted) == ["ReduceMean"]  # the axes Constant went too
    (node,) = converted.graph.node
    assert list(node.input) == ["x"]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "axes": [1],
        "keepdims": 1,
    }
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(converted, x=x)[0], _run(model, x=x)[0])


def test_shape_with_start_end_becomes_slice_below_15():
    model = _model(
        [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=3)],
        [helper.make_tensor_value_info("x", FLOAT, ["n", 4, 5, 6])],
        [helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
    )
    converted = _checked(model, 14)
    assert top_level_ops(converted) == ["Shape", "Constant", "Constant", "Constant", "Slice"]
    x = np.zeros((2, 4, 5, 6), np.float32)
    assert _run(converted, x=x)[0].tolist() == [4, 5]


def _wheres(*dtypes: int) -> onnx.ModelProto:
    """One ``Where`` per dtype, named ``where_<dtype>``, sharing the condition ``c``."""
    nodes, inputs, outputs = [], [helper.make_tensor_value_info("c", TensorProto.BOOL, [3])], []
    for dtype in dtypes:
        name = f"where_{TensorProto.DataType.Name(dtype).lower()}"
        nodes.append(
            helper.make_node("Where", ["c", f"{name}_x", f"{name}_x"], [f"{name}_y"], name=name)
        )
        inputs.append(helper.make_tensor_value_info(f"{name}_x", dtype, [3]))
        outputs.append(helper.make_tensor_value_info(f"{name}_y", dtype, [3]))
    return _model(nodes, inputs, outputs)


# (id, model, target, message): what cannot be down-converted names the node, the op, why,
# and what onnx's version converter said.
REFUSALS = [
    (
        "new_op",
        lambda: _model(
            [
                helper.make_node(
                    "LayerNormalization", ["x", "w"], ["y"], name="ln", axis=-1, epsilon=1e-5
                )
            ],
            [
                helper.make_tensor_value_info("x", FLOAT, [2, 4]),
                helper.make_tensor_value_info("w", FLOAT, [4]),
            ],
            [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
        ),
        16,
        r"opset 16 cannot be met: node 'ln' \(LayerNormalization\) needs opset 17 or newer; "
        r"onnx's version converter: No Previous Version of LayerNormalization exists",
    ),
    (
        "type_the_old_op_lacks",
        lambda: _wheres(TensorProto.FLOAT, TensorProto.BFLOAT16),
        15,
        r"opset 15 cannot be met: node 'where_bfloat16' \(Where\) takes tensor\(bfloat16\) "
        r"as input 1 \(X\), which Where-9 does not accept; onnx's version converter: "
        r"DataType \(16\) of Input or Output of operator 'Where' is unallowed for Opset Version 15",
    ),
    (
        "computed_axes",
        lambda: _model(
            [helper.make_node("ReduceMax", ["x", "axes"], ["y"], name="max")],
            [
                helper.make_tensor_value_info("x", FLOAT, [2, 4]),
                helper.make_tensor_value_info("axes", TensorProto.INT64, [1]),
            ],
            [helper.make_tensor_value_info("y", FLOAT, None)],
        ),
        17,
        r"opset 17 cannot be met: node 'max' \(ReduceMax\) has 2 inputs; ReduceMax-13 takes 1; "
        r"onnx's version converter: No initializer or constant input to node found",
    ),
]


@pytest.mark.parametrize(
    ("build", "target", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_what_cannot_be_converted_raises_naming_op_and_reasons(build, target, message):
    with pytest.raises(OpsetError, match=message):
        convert(build(), target)


def test_only_the_node_the_converter_rejects_is_blamed():
    """Nodes of one op go to the converter together; one bad node must not hide the others."""
    assert top_level_ops(_checked(_wheres(FLOAT, TensorProto.DOUBLE), 15)) == ["Where"] * 2
    with pytest.raises(OpsetError, match=r"node 'where_bfloat16'"):
        convert(_wheres(FLOAT, TensorProto.BFLOAT16, TensorProto.DOUBLE), 15)


def test_upward_conversion_goes_through_the_converter():
    model = _split([2, 6], 1, 3)
    for target in (19, 21, 23, 28):
        converted = _checked(model, target)
        assert top_level_ops(converted) == ["Split"]
        x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
        for got, want in zip(_run(converted, x=x), _run(model, x=x), strict=True):
            np.testing.assert_array_equal(got, want)


OPSET_SOURCES = sorted((pathlib.Path(__file__).parents[1] / "export").glob("_opset*.py"))


def _swallowed(source: str) -> list[str]:
    """``except`` clauses that catch everything, or that drop what they catch (``pass``)."""
    found = []
    for handler in ast.walk(ast.parse(source)):
        if isinstance(handler, ast.ExceptHandler):
            caught = ast.unparse(handler.type) if handler.type else "everything"
            broad = re.fullmatch(r"everything|(Base)?Exception", caught)
            if broad or all(isinstance(s, ast.Pass) for s in handler.body):
                found.append(f"line {handler.lineno}: except {caught}")
    return found


def test_the_swallow_check_finds_what_it_looks_for():
    assert _swallowed("try:\n    f()\nexcept Exception:\n    pass\n") == [
        "line 3: except Exception"
    ]
    assert _swallowed("try:\n    f()\nexcept KeyError:\n    pass\n") == ["line 3: except KeyError"]
    assert _swallowed("try:\n    f()\nexcept KeyError as e:\n    raise E() from e\n") == []


@pytest.mark.parametrize("path", OPSET_SOURCES, ids=lambda p: p.name)
def test_no_error_is_swallowed(path):
    assert [p.name for p in OPSET_SOURCES] == ["_opset.py", "_opset_rewrites.py"]
    assert _swallowed(path.read_text()) == []


# Real architectures whose graphs carry Split-18 ``num_outputs`` (torch.chunk / split).
def _gpt2():
    import tests.thirdparty._torchvision  # noqa: F401  (transformers imports torchvision)

    # isort: split
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100)

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt2 = transformers.GPT2Model(config)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.gpt2(input_ids=input_ids).last_hidden_state

    return Hidden(), torch.randint(0, 100, (2, 7), dtype=torch.int64)


def _shufflenet():
    from tests.thirdparty._torchvision import torchvision

    return torchvision.models.shufflenet_v2_x0_5(), torch.randn(2, 3, 64, 64)


ARCHITECTURES = {"gpt2": _gpt2, "shufflenet_v2_x0_5": _shufflenet}


@functools.cache
def _architecture(name: str):
    torch.manual_seed(0)
    module, x = ARCHITECTURES[name]()
    module.eval()
    models = export.to_onnx_opsets(module, x, mode="eval", opsets=(13, 17), strict=False)
    with torch.no_grad():
        return models, x, module(x).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("target", [13, 17])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_real_architecture_matches_pytorch(name, target):
    models, x, expected = _architecture(name)
    model = models[target]
    assert default_opset(model) == target
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert splits and all(len(n.input) == 2 for n in splits)
    (got,) = session(model).run(None, {model.graph.input[0].name: x.numpy()})
    close(got, expected, f"{name} opset {target}")
