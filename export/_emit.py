"""Building blocks for lowerings: a node emitter and ONNX functions written as text.

Functions (``FunctionProto``) are written in ONNX's textual syntax, one body per layer, and
instantiated for the model's opset: the only construct that differs across opsets 13-28 is how
a reduction receives its axes (an attribute below opset 18, an input from 18 on), which
:meth:`Body.reduce_mean` hides.  Every function attribute is passed explicitly at the call
site (``onnx.inliner`` drops FunctionProto attribute defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.parser
from onnx import TensorProto, helper, numpy_helper

__all__ = ["FUNCTION_DOMAIN", "Body", "Emitter", "Inputs"]

FUNCTION_DOMAIN = "normport"

_TEXT_TYPES = {TensorProto.FLOAT: "float", TensorProto.DOUBLE: "double"}


@dataclass(frozen=True)
class Inputs:
    """Value names feeding one layer ("" where absent)."""

    x: str
    weight: str = ""
    bias: str = ""
    running_mean: str = ""
    running_var: str = ""
    num_batches_tracked: str = ""
    mean_weight: str = ""
    var_weight: str = ""


@dataclass
class Emitter:
    """Collects what lowerings add to one model: nodes, initializers and functions."""

    opset: int
    elem_type: int  # activation dtype (TensorProto.FLOAT, FLOAT16, ...)
    taken: set[str]  # value names already in the graph
    initializer_values: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    functions: dict[str, onnx.FunctionProto] = field(default_factory=dict)

    @property
    def compute_type(self) -> int:
        """Statistics are computed in float32 for half types (float64 stays float64)."""
        return TensorProto.DOUBLE if self.elem_type == TensorProto.DOUBLE else TensorProto.FLOAT

    def fresh(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.taken:
            candidate, i = f"{name}_{i}", i + 1
        self.taken.add(candidate)
        return candidate

    def constant(self, name: str, array: np.ndarray) -> str:
        """An initializer (name made unique), returns its name."""
        name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def filled(self, name: str, shape: Sequence[int], value: float) -> str:
        """A constant of the activation dtype, e.g. ones for an absent scale."""
        dtype = helper.tensor_dtype_to_np_dtype(self.elem_type)
        return self.constant(name, np.full(tuple(shape), value, dtype=dtype))

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        *,
        name: str,
        domain: str = "",
        **attrs,
    ) -> onnx.NodeProto:
        node = helper.make_node(
            op_type, list(inputs), list(outputs), name=self.fresh(name), domain=domain, **attrs
        )
        self.nodes.append(node)
        return node

    def call(
        self,
        function: onnx.FunctionProto,
        inputs: Sequence[str],
        outputs: Sequence[str],
        *,
        name: str,
        **attrs,
    ) -> onnx.NodeProto:
        """A call of a model-local function; the function is added once per model."""
        existing = self.functions.setdefault(function.name, function)
        if existing.SerializeToString() != function.SerializeToString():
            raise RuntimeError(f"two different bodies for function {function.name!r}")
        missing = set(function.attribute) - set(attrs)
        if missing:
            raise RuntimeError(f"call of {function.name} must pass every attribute: {missing}")
        return self.node(function.name, inputs, outputs, name=name, domain=FUNCTION_DOMAIN, **attrs)

    def body(self) -> Body:
        return Body(self.opset, self.elem_type, self.compute_type)


@dataclass
class Body:
    """A function body under construction, in ONNX's textual syntax."""

    opset: int
    elem_type: int
    compute_type: int
    lines: list[str] = field(default_factory=list)
    _count: int = 0

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def tmp(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    @property
    def ct(self) -> str:
        return _TEXT_TYPES[self.compute_type]

    def scalar(self, value: float) -> str:
        """A compute-typed scalar literal."""
        name = self.tmp("c")
        self(f"{name} = Constant <value = {self.ct} {{{value!r}}}> ()")
        return name

    def scalar_attr(self, attr: str) -> str:
        """A compute-typed scalar from a float attribute of the function."""
        name = self.tmp(attr)
        self(f"{name} = Constant <value_float: float = @{attr}> ()")
        if self.compute_type != TensorProto.FLOAT:
            cast = self.tmp(attr)
            self(f"{cast} = Cast <to = {self.compute_type}> ({name})")
            return cast
        return name

    def ints(self, values: Sequence[int] | str) -> str:
        """An int64 1-D constant: literal values, or ``"@attr"`` for an ints attribute."""
        name = self.tmp("axes")
        if isinstance(values, str):
            self(f"{name} = Constant <value_ints: ints = {values}> ()")
        else:
            self(f"{name} = Constant <value_ints = [{', '.join(str(v) for v in values)}]> ()")
        return name

    def reduce_mean(self, x: str, axes: Sequence[int] | str) -> str:
        """``ReduceMean(x, axes, keepdims=1)``: axes as attribute below opset 18, else input."""
        out = self.tmp("mean")
        if self.opset >= 18:
            self(f"{out} = ReduceMean <keepdims = 1> ({x}, {self.ints(axes)})")
        elif isinstance(axes, str):
            self(f"{out} = ReduceMean <axes: ints = {axes}, keepdims = 1> ({x})")
        else:
            literal = ", ".join(str(a) for a in axes)
            self(f"{out} = ReduceMean <axes = [{literal}], keepdims = 1> ({x})")
        return out

    def channel_affine(self, xn: str) -> str:
        """``xn * Scale + B`` with the per-channel ``Scale`` and ``B`` inputs reshaped to the
        function's ``@channel_shape`` attribute (e.g. ``[C, 1, 1]`` for ``(N, C, H, W)``)."""
        cs = self.ints("@channel_shape")
        s, t, ys, y = self.tmp("s"), self.tmp("t"), self.tmp("ys"), self.tmp("y")
        self(f"{s} = Reshape ({self.to_compute('Scale')}, {cs})")
        self(f"{t} = Reshape ({self.to_compute('B')}, {cs})")
        self(f"{ys} = Mul ({xn}, {s})")
        self(f"{y} = Add ({ys}, {t})")
        return y

    def to_compute(self, x: str) -> str:
        if self.elem_type == self.compute_type:
            return x
        out = self.tmp(x)
        self(f"{out} = Cast <to = {self.compute_type}> ({x})")
        return out

    def to_output(self, y: str, out: str) -> None:
        if self.elem_type == self.compute_type:
            self(f"{out} = Identity ({y})")
        else:
            self(f"{out} = Cast <to = {self.elem_type}> ({y})")

    def function(
        self, name: str, attrs: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]
    ) -> onnx.FunctionProto:
        header = (
            f'<domain: "{FUNCTION_DOMAIN}", opset_import: ["" : {self.opset}]>\n'
            f"{name} <{', '.join(attrs)}> ({', '.join(inputs)}) => ({', '.join(outputs)})\n"
        )
        text = header + "{\n" + "\n".join(f"    {line}" for line in self.lines) + "\n}\n"
        return onnx.parser.parse_function(text)
