"""Bring a traced graph (opset 18) to the requested opset, or say which op makes it impossible.

torch.onnx translates at opset 18; asked for less, it silently hands back opset 18, and asked
for more it may fail to convert and keep opset-18 nodes under a newer opset_import (seen:
Gelu at opset 28).  normport therefore always traces at 18 and converts itself:

- upwards, with onnx's version converter; if that lacks an adapter, by relabelling (below);
- downwards, by relabelling: a node keeps its form when its operator is defined at the
  target opset with the attributes and inputs the node uses.  Attributes the older operator
  lacks are dropped when they hold the newer operator's default; reductions whose ``axes``
  moved from attribute to input at opset 18 get them back as an attribute; ``Shape`` with
  ``start``/``end`` (opset 15) becomes ``Shape`` + ``Slice``.

Anything else raises :class:`OpsetError` naming the node and the op.  The caller then holds the
result to onnx's full checker and strict shape inference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper, version_converter

__all__ = ["OpsetError", "convert", "default_opset"]

# Reductions that took ``axes`` as an attribute before opset 18 (ReduceSum moved at 13).
_AXES_MOVED_AT_18 = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}


class OpsetError(ValueError):
    """The requested opset cannot be met: names the op that blocks it."""


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _schema(op_type: str, version: int):
    try:
        return defs.get_schema(op_type, version, "")
    except defs.SchemaError:
        return None


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_ints":
                    values[node.output[0]] = np.array(list(attr.ints), dtype=np.int64)
    return values


def _set_version(model: onnx.ModelProto, target: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = target


def convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of ``model`` whose default domain is at opset ``target``."""
    current = default_opset(model)
    if target == current:
        return model
    if target > current:
        try:
            return version_converter.convert_version(model, target)
        except Exception:
            pass
    return _relabel(model, current, target)


def _relabel(model: onnx.ModelProto, current: int, target: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = _constant_values(out)
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        nodes.extend(_relabel_node(node, current, target, constants))
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    _set_version(out, target)
    return out


def _fail(target: int, node: onnx.NodeProto, why: str) -> OpsetError:
    return OpsetError(f"opset {target} cannot be met: node {node.name!r} ({node.op_type}) {why}")


def _relabel_node(
    node: onnx.NodeProto, current: int, target: int, constants: dict[str, np.ndarray]
) -> list[onnx.NodeProto]:
    schema = _schema(node.op_type, target)
    if schema is None:
        first = defs.get_schema(node.op_type, current, "").since_version
        raise _fail(target, node, f"needs opset {first} or newer")
    extra: list[onnx.NodeProto] = []
    if node.op_type in _AXES_MOVED_AT_18 and target < 18 and len(node.input) > 1:
        if node.input[1] not in constants:
            raise _fail(target, node, "has computed axes, which only opset 18 accepts")
        axes = constants[node.input[1]].tolist()
        del node.input[1:]
        node.attribute.append(helper.make_attribute("axes", axes))
    if node.op_type == "Shape" and target < 15:
        extra = _shape_slice(node)
    if node.op_type == "Reshape" and target < 14:
        _drop_allowzero(node, constants, target)
    newer = defs.get_schema(node.op_type, current, "")
    for attr in list(node.attribute):
        if attr.name in schema.attributes:
            continue
        default = (
            newer.attributes[attr.name].default_value if attr.name in newer.attributes else None
        )
        if (
            default is None
            or not default.name
            or helper.get_attribute_value(default) != helper.get_attribute_value(attr)
        ):
            raise _fail(
                target,
                node,
                f"sets attribute {attr.name!r}, which {node.op_type}-{schema.since_version} "
                "does not have",
            )
        node.attribute.remove(attr)
    variadic = schema.inputs and schema.inputs[-1].option == schema.inputs[-1].option.Variadic
    if len(node.input) > len(schema.inputs) and not variadic:
        raise _fail(
            target,
            node,
            f"has {len(node.input)} inputs; {node.op_type}-{schema.since_version} takes "
            f"{len(schema.inputs)}",
        )
    return [node, *extra]


def _drop_allowzero(node: onnx.NodeProto, constants: dict[str, np.ndarray], target: int) -> None:
    """torch.onnx marks every Reshape ``allowzero=1`` (a 0 in the shape means zero, not "copy").

    The two readings differ only where the shape holds a 0: a constant shape is checked; a
    computed one comes from tensor sizes, which the exported dynamic dims keep >= 1.
    """
    for attr in list(node.attribute):
        if attr.name == "allowzero" and attr.i == 1:
            shape = constants.get(node.input[1])
            if shape is not None and (shape == 0).any():
                raise _fail(target, node, "reshapes to a zero-size dim, which needs opset 14")
            node.attribute.remove(attr)


def _shape_slice(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``Shape<start, end>(x)`` (opset 15) as ``Slice(Shape(x), start, end)``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "start" not in attrs and "end" not in attrs:
        return []
    start, end = attrs.get("start", 0), attrs.get("end", np.iinfo(np.int64).max)
    node.ClearField("attribute")
    full = f"{node.output[0]}__full"
    out = node.output[0]
    node.output[0] = full
    consts = []
    names = []
    for tag, value in (("starts", start), ("ends", end), ("axes", 0)):
        name = f"{out}__{tag}"
        consts.append(
            helper.make_node(
                "Constant",
                [],
                [name],
                name=f"{node.name}_{tag}",
                value=numpy_helper.from_array(np.array([value], dtype=np.int64)),
            )
        )
        names.append(name)
    sliced = helper.make_node("Slice", [full, *names], [out], name=f"{node.name}_slice")
    return [*consts, sliced]
