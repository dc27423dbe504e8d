"""The rewrites of :mod:`export.train_graph`: a training graph to its inference graph with
given running statistics (:func:`to_eval`), or to its per-batch form (:func:`per_batch_form`).

:func:`to_eval`.

Every training call of a layer with running statistics is replaced by exactly what
:func:`export.to_onnx` emits for that layer in eval mode (the lowerings of
:mod:`export.lowerings` are reused, fed with the new statistics as initializers):

=========================================  ==========================================
training call (domain ``normport``)        inference form (``export.lowerings``)
=========================================  ==========================================
``BatchNormTrain[Cumulative]``, (N, C, *)  ``BatchNormalization``
``BatchNormTrain[Cumulative]``, (N, L, C)  ``X * s + t`` folded (SequenceBatchNorm)
``InstanceNormTrain[Frozen]``              ``BatchNormalization``
``SwitchableNormTrain[Cumulative]``        function ``SwitchableNorm``
``Dropout`` (``training_mode`` given)      ``Identity``
=========================================  ==========================================

Every other node computes the same in both modes (LayerNormalization, the GroupNorm and
RMSNorm functions, ``*BatchStats`` for layers without running statistics, ...) and is kept.  The
table is keyed by :class:`TrainFunction`: a training function not in it raises, naming the node.

The rules are applied as an onnx_ir rewrite (``replace_nodes_and_values``).  onnxscript's
pattern rewriter is not used: a replacement there must give every output of the matched call,
while here the three state outputs go away with the graph's state outputs, and the replacement
must be what the lowering emits (one source for each eval form).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from normport.export._emit import FUNCTION_DOMAIN, Emitter, Inputs
from normport.export._finalize import finalize
from normport.export._opset import default_opset
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import lowering_for
from normport.export.lowerings.batchnorm import batch_stats_function
from normport.export.lowerings.switchable import switchable_function
from normport.export.train_graph import (
    STATE_NAMES,
    TrainFunction,
    layer_path,
    state_pairs,
)

__all__ = ["REWRITES", "per_batch_form", "rewrite_to_eval"]

_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _spec(kind: str, cls: str, node: onnx.NodeProto, rank: int, channels: int) -> LayerSpec:
    return LayerSpec(
        kind=kind,
        path=layer_path(node),
        cls=cls,
        rank=rank,
        channels=channels,
        eps=float(_attrs(node)["epsilon"]),
        batch_stats=False,
        update_stats=False,
    )


def _batchnorm(em: Emitter, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    axes = [int(a) for a in attrs["axes"]]
    rank = len(axes) + 1
    channel_axis = next(a for a in range(rank) if a not in axes)
    channels = int(attrs["channel_shape"][0])
    x, scale, bias, mean, var = node.input[:5]
    if rank >= 3 and channel_axis == rank - 1:  # SequenceBatchNorm's channel-last (N, L, C)
        for name in (scale, bias):
            if name not in em.initializer_values:
                raise ValueError(
                    f"node {node.name!r}: SequenceBatchNorm's eval form folds the affine "
                    f"parameters, but {name!r} is computed, not an initializer"
                )
        spec = _spec("sequence_batchnorm", "SequenceBatchNorm", node, rank, channels)
    else:
        spec = _spec("batchnorm", f"BatchNorm{max(rank - 2, 1)}d", node, rank, channels)
    ins = Inputs(x, scale, bias, mean, var)
    lowering_for(spec).lower(em, spec, ins, [node.output[0]])


def _instancenorm(em: Emitter, node: onnx.NodeProto) -> None:
    shape = _attrs(node)["channel_shape"]
    rank = len(shape) + 1
    spec = _spec("instancenorm", f"InstanceNorm{rank - 2}d", node, rank, int(shape[0]))
    x, scale, bias, mean, var = node.input[:5]
    lowering_for(spec).lower(em, spec, Inputs(x, scale, bias, mean, var), [node.output[0]])


def _switchable(em: Emitter, node: onnx.NodeProto) -> None:
    shape = _attrs(node)["channel_shape"]
    rank = len(shape) + 1
    spec = _spec("switchable", f"SwitchableNorm{rank - 2}d", node, rank, int(shape[0]))
    x, scale, bias, mean, var, _count, mean_weight, var_weight = node.input[:8]
    ins = Inputs(x, scale, bias, mean, var, mean_weight=mean_weight, var_weight=var_weight)
    lowering_for(spec).lower(em, spec, ins, [node.output[0]])


Rewrite = Callable[[Emitter, onnx.NodeProto], None]

_BY_KIND: dict[str, Rewrite] = {
    "batchnorm": _batchnorm,
    "instancenorm": _instancenorm,
    "switchable": _switchable,
}
REWRITES: dict[str, Rewrite] = {f.value: _BY_KIND[f.kind] for f in TrainFunction}


def rewrite_to_eval(
    train_model: onnx.ModelProto, statistics: Mapping[str, np.ndarray], metadata: dict[str, str]
) -> onnx.ModelProto:
    """:func:`export.train_graph.to_eval` once ``metadata`` (the inference graph's) is known.

    An onnx_ir rewrite: the statistics go into the state initializers, the state inputs and
    outputs leave the graph's signature, each training call and training-mode Dropout is
    replaced through its rule (its first output's users read the replacement's), and
    :func:`export._finalize.finalize` drops what is dead (the training functions, Dropout's
    constant feeds).
    """
    model = ir.serde.deserialize_model(train_model)
    graph = model.graph
    pairs = state_pairs(train_model)
    _set_statistics(graph, [name for name, _ in pairs], statistics)
    state = {name for pair in pairs for name in pair}
    for values in (graph.inputs, graph.outputs):
        for value in [v for v in values if v.name in state]:
            values.remove(value)
    em = _emitter(model, [name for name, _ in pairs])
    rewritten = 0
    for node in list(graph):
        if node.domain == FUNCTION_DOMAIN and node.op_type in REWRITES:
            _replace(graph, node, _lowered(graph, em, node))
            rewritten += 1
        elif node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and len(node.inputs) > 2:
            _replace(graph, node, [_dropout_to_identity(node)])
        else:
            _check_supported(node)
    if pairs and not rewritten:
        raise ValueError(
            "the training graph has running statistics but no normport training calls "
            "(exported with inline=True?); export it with inline=False to recalibrate"
        )
    _add_functions(model, train_model, em.functions)
    return finalize(ir.serde.serialize_model(model), metadata)


def _set_statistics(
    graph: ir.Graph, names: list[str], statistics: Mapping[str, np.ndarray]
) -> None:
    """Each state initializer takes its value from ``statistics``, in its own dtype."""
    missing = [name for name in names if name not in statistics]
    if missing:
        raise ValueError(f"no recalibrated value for state input(s) {missing}")
    for name in names:
        value = graph.initializers[name]
        dtype = value.const_value.dtype.numpy()
        value.const_value = ir.tensor(np.asarray(statistics[name]).astype(dtype), name=name)


def _emitter(model: ir.Model, state: list[str]) -> Emitter:
    """An emitter for the lowerings at the model's opset and the running statistics' dtype,
    with every name in the graph taken and the (new) initializer values readable."""
    graph = model.graph
    values = ir.convenience.create_value_mapping(graph)
    means = [values[n] for n in state if n.endswith(STATE_NAMES[0])]
    elem_type = int(means[0].const_value.dtype) if means else onnx.TensorProto.FLOAT
    taken = set(values) | {node.name for node in graph if node.name}
    return Emitter(
        model.opset_imports[""],
        elem_type,
        taken=taken,
        initializer_values={n: v.const_value.numpy() for n, v in graph.initializers.items()},
    )


def _lowered(graph: ir.Graph, em: Emitter, node: ir.Node) -> list[ir.Node]:
    """The nodes the call's rule emits (the eval lowering of its layer), wired to the graph's
    values by name; the initializers they add join the graph."""
    em.nodes, em.initializers = [], []
    REWRITES[node.op_type](em, ir.serde.serialize_node(node))
    for tensor in em.initializers:
        value = ir.Value(name=tensor.name, const_value=ir.serde.deserialize_tensor(tensor))
        graph.register_initializer(value)
    values = ir.convenience.create_value_mapping(graph)
    nodes = []
    for proto in em.nodes:
        new = ir.serde.deserialize_node(proto)
        for i, name in enumerate(proto.input):
            if name:
                new.replace_input_with(i, values[name])
        values.update({v.name: v for v in new.outputs if v.name})
        nodes.append(new)
    return nodes


def _replace(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node]) -> None:
    """``nodes`` (the last one computing ``node``'s first output) in place of ``node``, whose
    other outputs must be unused by now."""
    new = nodes[-1].outputs[0]
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [node.outputs[0]], [new])


def _dropout_to_identity(node: ir.Node) -> ir.Node:
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        raise ValueError(f"node {node.name!r}: Dropout's mask output is used; cannot rewrite it")
    return ir.node("Identity", [node.inputs[0]], name=node.name)


def _check_supported(node: ir.Node) -> None:
    if node.domain == FUNCTION_DOMAIN and "Train" in node.op_type:
        raise ValueError(
            f"node {node.name!r} calls {node.domain}.{node.op_type}, which has no inference "
            f"rewrite; known: {', '.join(sorted(REWRITES))}"
        )
    if node.op_type == "BatchNormalization" and node.attributes.get_int("training_mode", 0):
        raise ValueError(
            f"node {node.name!r} is BatchNormalization(training_mode=1) (not a normport "
            "lowering); export the model with normport layers"
        )


def _add_functions(
    model: ir.Model, train_model: onnx.ModelProto, added: Mapping[str, onnx.FunctionProto]
) -> None:
    """The lowerings' functions join the model's; one name, one body."""
    held = {f.name: f for f in train_model.functions}
    for name, function in added.items():
        if name in held:
            if held[name].SerializeToString() != function.SerializeToString():
                raise ValueError(f"the graph already has a different function {name!r}")
            continue
        fn = ir.serde.deserialize_function(function)
        model.functions[fn.identifier()] = fn


def _elem_type(model: onnx.ModelProto) -> int:
    """The activation type the export used: its first floating graph input's (export.api)."""
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if elem in _FLOAT_TYPES and not value.name.endswith(STATE_NAMES[:2]):
            return elem
    return onnx.TensorProto.FLOAT


def _momentum_function(em: Emitter, call: TrainFunction) -> onnx.FunctionProto:
    if call is TrainFunction.SWITCHABLE:
        return switchable_function(em, "attr", False)
    instance = call is TrainFunction.INSTANCENORM
    return batch_stats_function(em, call, momentum="attr", counts=not instance, instance=instance)


def per_batch_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """See :func:`export.train_graph.per_batch_form`: each call becomes its momentum form with
    ``momentum=1.0`` at the call site; a function the model does not define yet is emitted as
    :mod:`export.lowerings` would for that layer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = default_opset(out)
    em = Emitter(opset, _elem_type(out), taken=set())
    defined = {f.name for f in out.functions}
    for node in out.graph.node:
        if node.domain != FUNCTION_DOMAIN or node.op_type not in REWRITES:
            continue
        target = TrainFunction(node.op_type).momentum_form
        if target not in defined:
            out.functions.append(_momentum_function(em, target))
            defined.add(target)
        node.op_type = target
        kept = [a for a in node.attribute if a.name != "momentum"]
        node.ClearField("attribute")
        node.attribute.extend([*kept, helper.make_attribute("momentum", 1.0)])
    return out
