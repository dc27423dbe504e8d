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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

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


def _dropout_to_identity(node: onnx.NodeProto, consumed: set[str]) -> onnx.NodeProto:
    if len(node.output) > 1 and node.output[1] and node.output[1] in consumed:
        raise ValueError(f"node {node.name!r}: Dropout's mask output is used; cannot rewrite it")
    return helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)


def _check_supported(node: onnx.NodeProto) -> None:
    if node.domain == FUNCTION_DOMAIN and "Train" in node.op_type:
        raise ValueError(
            f"node {node.name!r} calls {node.domain}.{node.op_type}, which has no inference "
            f"rewrite; known: {', '.join(sorted(REWRITES))}"
        )
    if node.op_type == "BatchNormalization" and _attrs(node).get("training_mode", 0):
        raise ValueError(
            f"node {node.name!r} is BatchNormalization(training_mode=1) (not a normport "
            "lowering); export the model with normport layers"
        )


def rewrite_to_eval(
    train_model: onnx.ModelProto, statistics: Mapping[str, np.ndarray], metadata: dict[str, str]
) -> onnx.ModelProto:
    """:func:`export.train_graph.to_eval` once ``metadata`` (the inference graph's) is known:
    the statistics into the state initializers, every call through its rule, the state inputs
    and outputs removed, then the clean-up of :func:`export._finalize.finalize`."""
    model = onnx.ModelProto()
    model.CopyFrom(train_model)
    pairs = state_pairs(model)
    _set_statistics(model.graph, [name for name, _ in pairs], statistics)
    em = _emitter(model, [name for name, _ in pairs])
    nodes, rewritten = _rewrite_calls(model.graph, em)
    if pairs and not rewritten:
        raise ValueError(
            "the training graph has running statistics but no normport training calls "
            "(exported with inline=True?); export it with inline=False to recalibrate"
        )
    _drop_state(model.graph, {name for pair in pairs for name in pair})
    model.graph.initializer.extend(em.initializers)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    _add_functions(model, em.functions)
    # finalize's clean-up drops what is now dead: Dropout's constant feeds, the training
    # functions, the normport opset import when no function is left.
    return finalize(model, metadata)


def _set_statistics(
    graph: onnx.GraphProto, names: list[str], statistics: Mapping[str, np.ndarray]
) -> None:
    """Each state initializer takes its value from ``statistics``, in its own dtype."""
    missing = [name for name in names if name not in statistics]
    if missing:
        raise ValueError(f"no recalibrated value for state input(s) {missing}")
    initializers = {t.name: t for t in graph.initializer}
    for name in names:
        old = initializers[name]
        dtype = helper.tensor_dtype_to_np_dtype(old.data_type)
        old.CopyFrom(numpy_helper.from_array(np.asarray(statistics[name]).astype(dtype), name))


def _emitter(model: onnx.ModelProto, state: list[str]) -> Emitter:
    """An emitter for the lowerings, at the model's opset and the running statistics' dtype,
    with every name in the graph taken."""
    graph = model.graph
    means = [t for t in graph.initializer if t.name in state and t.name.endswith(STATE_NAMES[0])]
    elem_type = means[0].data_type if means else onnx.TensorProto.FLOAT
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {v.name for v in graph.output} | {n.name for n in graph.node}
    taken |= {o for n in graph.node for o in (*n.input, *n.output)}
    return Emitter(
        default_opset(model),
        elem_type,
        taken=taken,
        initializer_values={t.name: numpy_helper.to_array(t) for t in graph.initializer},
    )


def _rewrite_calls(graph: onnx.GraphProto, em: Emitter) -> tuple[list[onnx.NodeProto], int]:
    """The graph's nodes with every rule applied, and how many training calls it rewrote."""
    consumed = {i for n in graph.node for i in n.input}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        if node.domain == FUNCTION_DOMAIN and node.op_type in REWRITES:
            em.nodes = []
            REWRITES[node.op_type](em, node)
            nodes.extend(em.nodes)
            rewritten += 1
        elif node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and len(node.input) > 2:
            nodes.append(_dropout_to_identity(node, consumed))
        else:
            _check_supported(node)
            nodes.append(node)
    return nodes, rewritten


def _drop_state(graph: onnx.GraphProto, state: set[str]) -> None:
    """Removes the state inputs and outputs (the initializers stay: the lowerings read them)."""
    for field in (graph.input, graph.output):
        kept = [v for v in field if v.name not in state]
        del field[:]
        field.extend(kept)


def _add_functions(model: onnx.ModelProto, added: Mapping[str, onnx.FunctionProto]) -> None:
    """The lowerings' functions join the model's, sorted by name; one name, one body."""
    functions = {f.name: f for f in model.functions}
    for name, function in added.items():
        if name in functions and functions[name].SerializeToString() != (
            function.SerializeToString()
        ):
            raise ValueError(f"the graph already has a different function {name!r}")
        functions[name] = function
    model.ClearField("functions")
    model.functions.extend(functions[name] for name in sorted(functions))


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
