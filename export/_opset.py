"""Bring a traced graph (opset 18) to the requested opset, or say which op makes it impossible.

torch.onnx translates at opset 18; asked for less, it silently hands back opset 18, and asked
for more it may fail to convert and keep opset-18 nodes under a newer opset_import (seen:
Gelu at opset 28).  normport therefore always traces at 18 and converts itself, node by node:

1. a node whose operator is the same schema at both opsets stays as it is;
2. otherwise onnx's version converter converts it, all nodes of one op type in one call (it
   knows e.g. the reductions' ``axes`` input -> attribute at 17, type restrictions, every
   upward step; it has no downward adapter for most ops, e.g. none for Add 14 -> 13);
3. where it fails, normport's own rewrite for the op, if any (:mod:`export._opset_rewrites`:
   Split, HardSwish, Shape, Reshape), then a relabel: the node keeps its form when its
   operator is defined at the target opset with the attributes, inputs and input types the
   node uses; attributes the older operator lacks are dropped when they hold the newer
   operator's default.

When 3 fails too, :class:`OpsetError` names the node and the op and gives both reasons, the
rewrite's and the converter's.  The caller then holds the result to onnx's full checker and
strict shape inference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper, shape_inference, version_converter

from normport.export._opset_rewrites import REWRITES, CannotRewrite, Context

__all__ = ["OpsetError", "convert", "default_opset"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Constants up to this many elements go into the models the converter sees (its adapters
# read ``axes`` and the like) and to the rewrites; larger ones (weights) travel as types.
_SMALL_CONSTANT = 4096
# How onnx's converter says that it has no adapter for an op at all (BaseConverter.h,
# no_previous_version.h): true of every node of that op.
_NO_ADAPTER = ("No Adapter", "No Previous Version")


class OpsetError(ValueError):
    """The requested opset cannot be met: names the op that blocks it."""


class _ConverterFailed(Exception):
    """onnx's version converter could not convert a group of nodes; ``str()`` says why."""


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``""`` / ``ai.onnx``) domain ``model`` imports.

    Raises:
        ValueError: it imports none.
    """
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return entry.version
    raise ValueError("the model imports no default-domain opset")


def _schema(op_type: str, version: int) -> defs.OpSchema | None:
    try:
        return defs.get_schema(op_type, version, "")
    except defs.SchemaError:
        return None


def _same_schema(op_type: str, current: int, target: int) -> bool:
    a, b = _schema(op_type, current), _schema(op_type, target)
    return a is not None and b is not None and a.since_version == b.since_version


def convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of ``model`` whose default domain is at opset ``target``."""
    current = default_opset(model)
    if target == current:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ctx = _context(out)
    pending: dict[str, list[int]] = {}  # op type -> positions of the nodes to convert
    for i, node in enumerate(out.graph.node):
        if node.domain not in _DEFAULT_DOMAINS or _same_schema(node.op_type, current, target):
            continue
        if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise _fail(target, node, "holds a subgraph; normport converts flat graphs only")
        pending.setdefault(node.op_type, []).append(i)
    converted: dict[int, list[onnx.NodeProto] | str] = {}
    for positions in pending.values():
        group = {i: out.graph.node[i] for i in positions}
        converted.update(_by_converter(group, current, target, ctx, out.ir_version))
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(out.graph.node):
        result = converted.get(i, [node])
        nodes.extend(
            _fallback(node, current, target, ctx, result) if isinstance(result, str) else result
        )
    out.graph.ClearField("node")
    out.graph.node.extend(_drop_unused_constants(nodes, out.graph))
    for imp in out.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            imp.version = target
    return out


def _fail(target: int, node: onnx.NodeProto, why: str) -> OpsetError:
    return OpsetError(f"opset {target} cannot be met: node {node.name!r} ({node.op_type}) {why}")


def _fallback(
    node: onnx.NodeProto, current: int, target: int, ctx: Context, reason: str
) -> list[onnx.NodeProto]:
    """normport's rewrite for ``node``, if any, then the relabel; ``reason``: the converter's."""
    original = onnx.NodeProto()
    original.CopyFrom(node)
    rewrite = REWRITES.get(node.op_type)
    try:
        nodes = rewrite.apply(node, ctx) if rewrite and target < rewrite.below else [node]
        for n in nodes:
            if n.domain in _DEFAULT_DOMAINS:
                _relabel(n, current, target, ctx)
    except CannotRewrite as err:
        raise _fail(target, original, f"{err}; onnx's version converter: {reason}") from None
    return nodes


def _context(model: onnx.ModelProto) -> Context:
    graph = model.graph
    produced = {o for n in graph.node for o in n.output if o}
    values = (*graph.input, *graph.value_info, *graph.output)
    if not produced <= {v.name for v in values}:  # hand-built graphs: infer what is missing
        graph = shape_inference.infer_shapes(model).graph
        values = (*graph.input, *graph.value_info, *graph.output)
    types = {v.name: v.type for v in values if v.type.HasField("tensor_type")}
    constants = {}
    for t in model.graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        if np.prod(t.dims, dtype=np.int64) <= _SMALL_CONSTANT:
            constants[t.name] = numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and np.prod(attr.t.dims) <= _SMALL_CONSTANT:
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_ints":
                    constants[node.output[0]] = np.array(list(attr.ints), dtype=np.int64)
    taken = set(types) | produced | {n.name for n in model.graph.node}
    taken.update(i for n in model.graph.node for i in n.input)
    return Context(types, constants, taken)


def _by_converter(
    group: dict[int, onnx.NodeProto], current: int, target: int, ctx: Context, ir_version: int
) -> dict[int, list[onnx.NodeProto] | str]:
    """Each node of one op type, converted by onnx's converter, or the converter's reason.

    The converter costs ~30 ms a call however small the model, so the nodes go in together;
    only where that fails for a reason other than a missing adapter (which holds for every
    node of the op) does each node get its own call.
    """
    try:
        return _convert_nodes(group, current, target, ctx, ir_version)
    except _ConverterFailed as err:
        reason = str(err)
    if len(group) == 1 or reason.startswith(_NO_ADAPTER):
        return dict.fromkeys(group, reason)
    results: dict[int, list[onnx.NodeProto] | str] = {}
    for i, node in group.items():
        try:
            results.update(_convert_nodes({i: node}, current, target, ctx, ir_version))
        except _ConverterFailed as err:
            results[i] = str(err)
    return results


def _value_info(name: str, ctx: Context) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto(name=name)
    if name in ctx.types:
        info.type.CopyFrom(ctx.types[name])
    return info


def _convert_nodes(
    group: dict[int, onnx.NodeProto], current: int, target: int, ctx: Context, ir_version: int
) -> dict[int, list[onnx.NodeProto] | str]:
    """``group`` converted by onnx's version converter as one model (the nodes, their inputs)."""
    nodes = list(group.values())
    produced = dict.fromkeys(o for n in nodes for o in n.output if o)
    inputs, given = [], {}
    for name in dict.fromkeys(i for n in nodes for i in n.input if i and i not in produced):
        if name in ctx.constants:
            given[name] = ctx.constants[name]
        else:
            inputs.append(_value_info(name, ctx))
    outputs = [_value_info(o, ctx) for o in produced]
    initializers = [numpy_helper.from_array(v, name) for name, v in given.items()]
    graph = helper.make_graph(nodes, "nodes", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", current)], ir_version=ir_version
    )
    try:
        converted = version_converter.convert_version(model, target).graph
    except (RuntimeError, version_converter.ConvertError) as err:
        # the C++ assertion text is "<file>:<line>: <function>: Assertion `...` failed: why"
        raise _ConverterFailed(str(err).rpartition("failed: ")[2].strip()) from err
    results: dict[int, list[onnx.NodeProto] | str] = {}
    for i, part in _adopt(converted, group, ctx, given).items():
        results[i] = part
        for n in part:  # its reductions 18 -> 17 keep ``noop_with_empty_axes``, unknown to 13
            try:
                _relabel(n, current, target, ctx)
            except CannotRewrite as err:
                results[i] = f"it gives a {n.op_type} that {err}"
                break
    return results


def _adopt(
    converted: onnx.GraphProto,
    group: dict[int, onnx.NodeProto],
    ctx: Context,
    given: dict[str, np.ndarray],
) -> dict[int, list[onnx.NodeProto]]:
    """The converter's nodes, per original node, its new values renamed to fresh graph names.

    A converted node ends with the one that writes an original output; the nodes before it
    (constants, casts the adapter added) belong to it as well.
    """
    owner = {o: i for i, node in group.items() for o in node.output if o}
    rename: dict[str, str] = {}
    new_constants: list[onnx.NodeProto] = []
    for t in converted.initializer:
        value = numpy_helper.to_array(t)
        kept = given.get(t.name)
        if kept is not None and kept.dtype == value.dtype and np.array_equal(kept, value):
            continue
        name, const = ctx.constant(f"{t.name}__converted", value)
        rename[t.name] = name
        new_constants.append(const)
    for n in converted.node:
        for o in n.output:
            if o and o not in owner:
                rename[o] = ctx.fresh(f"{o}__converted")
    parts: dict[int, list[onnx.NodeProto]] = {i: [] for i in group}
    pending = new_constants
    for n in converted.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
        pending.append(n)
        mine = [owner[o] for o in n.output if o in owner]
        if mine:
            n.name = group[mine[0]].name
            parts[mine[0]].extend(pending)
            pending = []
        else:
            n.name = ctx.fresh(n.output[0] if n.output else n.op_type)
    if pending:
        parts[max(parts)].extend(pending)
    return parts


def _relabel(node: onnx.NodeProto, current: int, target: int, ctx: Context) -> None:
    """Keep ``node`` as it is under opset ``target``, or raise :class:`CannotRewrite`."""
    schema = _schema(node.op_type, target)
    if schema is None:
        first = defs.get_schema(node.op_type, max(current, target), "").since_version
        raise CannotRewrite(f"needs opset {first} or newer")
    newer = _schema(node.op_type, max(current, target))
    for attr in list(node.attribute):
        if attr.name in schema.attributes:
            continue
        spec = newer.attributes.get(attr.name)
        default = spec.default_value if spec is not None else None
        if (
            default is None
            or not default.name
            or helper.get_attribute_value(default) != helper.get_attribute_value(attr)
        ):
            raise CannotRewrite(
                f"sets attribute {attr.name!r}, which {node.op_type}-{schema.since_version} "
                "does not have"
            )
        node.attribute.remove(attr)
    last = schema.inputs[-1] if schema.inputs else None
    variadic = last is not None and last.option == last.option.Variadic
    if len(node.input) > len(schema.inputs) and not variadic:
        raise CannotRewrite(
            f"has {len(node.input)} inputs; {node.op_type}-{schema.since_version} takes "
            f"{len(schema.inputs)}"
        )
    _check_types(node, schema, ctx)


def _check_types(node: onnx.NodeProto, schema: defs.OpSchema, ctx: Context) -> None:
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for i, name in enumerate(node.input):
        t = ctx.types.get(name)
        if not name or t is None or not t.tensor_type.elem_type or not schema.inputs:
            continue
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]
        actual = f"tensor({onnx.TensorProto.DataType.Name(t.tensor_type.elem_type).lower()})"
        if actual not in allowed.get(formal.type_str, {formal.type_str}):
            raise CannotRewrite(
                f"takes {actual} as input {i} ({formal.name}), which "
                f"{node.op_type}-{schema.since_version} does not accept"
            )


def _drop_unused_constants(
    nodes: list[onnx.NodeProto], graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """Constants that only fed what the conversion folded into attributes (``axes``)."""
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    return [
        n
        for n in nodes
        if n.op_type != "Constant" or n.domain not in _DEFAULT_DOMAINS or n.output[0] in used
    ]
