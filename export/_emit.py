"""What lowerings add to one model: nodes, initializers and calls of model-local functions.

The functions themselves are written with onnxscript (:mod:`export.lowerings._body`).  Every
function attribute is passed explicitly at the call site (``onnx.inliner`` drops
FunctionProto attribute defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normport.export._names import fresh

__all__ = ["DEFAULT_TARGET", "FUNCTION_DOMAIN", "TARGETS", "Emitter", "Inputs", "check_target"]

FUNCTION_DOMAIN = "normport"

TARGETS = ("onnxruntime", "standard")
"""What the exported forms are chosen for (the table: :mod:`export.lowerings._choices`):
``"onnxruntime"``, the fastest exact form under onnxruntime's CPU provider as measured;
``"standard"``, the standard op wherever the opset has one."""

DEFAULT_TARGET = "onnxruntime"


def check_target(target: object) -> str:
    """``target`` if it is one of :data:`TARGETS`, else a ``ValueError`` naming it."""
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(
            f"unknown export target {target!r}: expected one of {', '.join(map(repr, TARGETS))}"
        )
    return target


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
    target: str = DEFAULT_TARGET  # which form of each layer (export.lowerings._choices)

    def __post_init__(self) -> None:
        check_target(self.target)

    @property
    def compute_type(self) -> int:
        """Statistics are computed in float32 for half types (float64 stays float64)."""
        return TensorProto.DOUBLE if self.elem_type == TensorProto.DOUBLE else TensorProto.FLOAT

    def fresh(self, name: str) -> str:
        return fresh(name, self.taken)

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
