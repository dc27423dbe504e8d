"""normport's own down-conversions, for the ops onnx's version converter has no adapter for.

Each rewrite turns one opset-18 node into nodes that mean the same at an older opset; the
registry says below which opset each one is needed.  :mod:`export._opset` tries onnx's
converter first and comes here only when it fails.

=============  ==========  =========================================================
op             serves      rewrite
=============  ==========  =========================================================
Split          13-17       ``num_outputs=n`` -> explicit ``split`` sizes (an input)
HardSwish      13          ``x * HardSigmoid(x, alpha=1/6, beta=1/2)``
Shape          13-14       ``start`` / ``end`` -> ``Slice(Shape(x), start, end)``
Reshape        13          ``allowzero=1`` dropped where no 0 can reach the shape
=============  ==========  =========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from normport.export._names import fresh

__all__ = ["REWRITES", "CannotRewrite", "Context", "Rewrite"]


class CannotRewrite(ValueError):
    """Why a node cannot be expressed at the target opset (completes "node X (Op) ...")."""


@dataclasses.dataclass
class Context:
    """What a rewrite may look up in the graph being converted, and fresh value names."""

    types: dict[str, onnx.TypeProto]
    constants: dict[str, np.ndarray]
    taken: set[str]

    def fresh(self, base: str) -> str:
        return fresh(base, self.taken)

    def constant(self, base: str, value: np.ndarray) -> tuple[str, onnx.NodeProto]:
        name = self.fresh(base)
        node = helper.make_node(
            "Constant", [], [name], name=name, value=numpy_helper.from_array(value)
        )
        return name, node

    def static_dim(self, value: str, axis: int) -> int | None:
        """The size of ``value`` along ``axis`` when the graph fixes it, else None."""
        t = self.types.get(value)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim
        if not -len(dims) <= axis < len(dims):
            return None
        dim = dims[axis]
        return dim.dim_value if dim.HasField("dim_value") else None


@dataclasses.dataclass(frozen=True)
class Rewrite:
    below: int  # needed for targets below this opset (where the node's form first appears)
    apply: Callable[[onnx.NodeProto, Context], list[onnx.NodeProto]]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _drop_attribute(node: onnx.NodeProto, name: str) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)


def split_sizes(node: onnx.NodeProto, ctx: Context) -> list[onnx.NodeProto]:
    """Split-18 ``num_outputs=n`` as Split-13 with the sizes Split-18 implies.

    Split-18 cuts ``n`` chunks of ``c = ceil(d / n)`` along the axis, the last one holding the
    rest ``d - c * (n - 1)``: ``d=10, n=4 -> [3, 3, 3, 1]``.  A static ``d`` gives a constant;
    a dynamic one is computed in the graph (int64 division truncates, and ``d >= 0``)::

        d = Gather(Shape(x), [axis])         c = Div(Add(d, n - 1), n)
        rest = Sub(d, Mul(c, n - 1))         split = Concat(c, ..., c, rest)
    """
    attrs = _attrs(node)
    if "num_outputs" not in attrs:
        return [node]  # explicit sizes: Split-13 takes the same ``split`` input
    n, axis = int(attrs["num_outputs"]), int(attrs.get("axis", 0))
    _drop_attribute(node, "num_outputs")
    del node.input[1:]
    dim = ctx.static_dim(node.input[0], axis)
    if dim is not None:
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
        if sizes[-1] < 0:
            raise CannotRewrite(
                f"splits a dim of {dim} into {n} outputs of {chunk}: the last would have size "
                f"{sizes[-1]} (onnxruntime refuses the opset-18 Split too)"
            )
        name, const = ctx.constant(f"{node.output[0]}__split", np.array(sizes, np.int64))
        node.input.append(name)
        return [const, node]
    base = f"{node.output[0]}__split"
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], tag: str, **kwargs) -> str:
        out = ctx.fresh(f"{base}_{tag}")
        nodes.append(helper.make_node(op, inputs, [out], name=out, **kwargs))
        return out

    def const(tag: str, value: int) -> str:
        name, node_ = ctx.constant(f"{base}_{tag}", np.array([value], np.int64))
        nodes.append(node_)
        return name

    shape = add("Shape", [node.input[0]], "shape")
    dim_ = add("Gather", [shape, const("axis", axis)], "dim", axis=0)
    n_minus_1 = const("n_minus_1", n - 1)
    chunk_ = add("Div", [add("Add", [dim_, n_minus_1], "padded"), const("n", n)], "chunk")
    rest = add("Sub", [dim_, add("Mul", [chunk_, n_minus_1], "full")], "rest")
    node.input.append(add("Concat", [chunk_] * (n - 1) + [rest], "sizes", axis=0))
    return [*nodes, node]


def hardswish(node: onnx.NodeProto, ctx: Context) -> list[onnx.NodeProto]:
    """HardSwish-14 by its definition, ``x * max(0, min(1, x / 6 + 1/2))``, from opset-6 ops."""
    gate = ctx.fresh(f"{node.output[0]}__gate")
    return [
        helper.make_node(
            "HardSigmoid", [node.input[0]], [gate], name=gate, alpha=1.0 / 6.0, beta=0.5
        ),
        helper.make_node("Mul", [node.input[0], gate], [node.output[0]], name=node.name),
    ]


def shape_slice(node: onnx.NodeProto, ctx: Context) -> list[onnx.NodeProto]:
    """``Shape<start, end>(x)`` (opset 15) as ``Slice(Shape(x), start, end)``."""
    attrs = _attrs(node)
    if "start" not in attrs and "end" not in attrs:
        return [node]
    start, end = attrs.get("start", 0), attrs.get("end", np.iinfo(np.int64).max)
    node.ClearField("attribute")
    out = node.output[0]
    node.output[0] = ctx.fresh(f"{out}__full")
    nodes = [node]
    names = []
    for tag, value in (("starts", start), ("ends", end), ("axes", 0)):
        name, const = ctx.constant(f"{out}__{tag}", np.array([value], np.int64))
        nodes.append(const)
        names.append(name)
    nodes.append(helper.make_node("Slice", [node.output[0], *names], [out], name=f"{out}__slice"))
    return nodes


def drop_allowzero(node: onnx.NodeProto, ctx: Context) -> list[onnx.NodeProto]:
    """torch.onnx marks every Reshape ``allowzero=1`` (a 0 in the shape means zero, not "copy").

    The two readings differ only where the shape holds a 0: a constant shape is checked; a
    computed one comes from tensor sizes, which the exported dynamic dims keep >= 1.
    """
    if _attrs(node).get("allowzero") == 1:
        shape = ctx.constants.get(node.input[1])
        if shape is not None and (shape == 0).any():
            raise CannotRewrite("reshapes to a zero-size dim, which needs opset 14")
        _drop_attribute(node, "allowzero")
    return [node]


REWRITES: dict[str, Rewrite] = {
    "Split": Rewrite(below=18, apply=split_sizes),
    "HardSwish": Rewrite(below=14, apply=hardswish),
    "Shape": Rewrite(below=15, apply=shape_slice),
    "Reshape": Rewrite(below=14, apply=drop_allowzero),
}
