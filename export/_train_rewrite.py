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
    MODE_KEY,
    STATE_NAMES,
    StatefulLayer,
    TrainFunction,
    layer_path,
    state_pairs,
)

__all__ = ["REWRITES", "per_batch_form", "stateful_layers", "to_eval"]

_REQUIRED_METADATA = ("normport_version", "opset", MODE_KEY)
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


def _metadata(model: onnx.ModelProto, batches: int, method: str | None) -> dict[str, str]:
    metadata = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing or metadata[MODE_KEY] != "train":
        raise ValueError(
            f"not a normport training export: expected metadata {MODE_KEY}='train' (got "
            f"{metadata.get(MODE_KEY)!r}); missing keys {missing}"
        )
    metadata[MODE_KEY] = "eval"
    # The hash was taken over the PyTorch state_dict; the statistics are no longer that state.
    if "weights_sha256" in metadata:
        metadata["recalibrated_from_weights_sha256"] = metadata.pop("weights_sha256")
    metadata["recalibration_batches"] = str(batches)
    if method is not None:
        metadata["recalibration_method"] = method
    return metadata


def to_eval(
    train_model: onnx.ModelProto,
    statistics: Mapping[str, np.ndarray],
    *,
    batches: int,
    method: str | None = None,
) -> onnx.ModelProto:
    """See :func:`export.train_graph.to_eval`."""
    model = onnx.ModelProto()
    model.CopyFrom(train_model)
    graph = model.graph
    metadata = _metadata(model, batches, method)
    pairs = state_pairs(model)
    missing = [name for name, _ in pairs if name not in statistics]
    if missing:
        raise ValueError(f"no recalibrated value for state input(s) {missing}")
    initializers = {t.name: t for t in graph.initializer}
    for name, _ in pairs:
        old = initializers[name]
        new = numpy_helper.from_array(
            np.asarray(statistics[name]).astype(helper.tensor_dtype_to_np_dtype(old.data_type)),
            name,
        )
        old.CopyFrom(new)
    running_mean = next((initializers[n] for n, _ in pairs if n.endswith(STATE_NAMES[0])), None)
    elem_type = running_mean.data_type if running_mean is not None else onnx.TensorProto.FLOAT
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {v.name for v in graph.output} | {n.name for n in graph.node}
    taken |= {o for n in graph.node for o in (*n.input, *n.output)}
    opset = default_opset(model)
    em = Emitter(
        opset,
        elem_type,
        taken=taken,
        initializer_values={n: numpy_helper.to_array(t) for n, t in initializers.items()},
    )
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
    if pairs and not rewritten:
        raise ValueError(
            "the training graph has running statistics but no normport training calls "
            "(exported with inline=True?); export it with inline=False to recalibrate"
        )
    state = {name for pair in pairs for name in pair}
    kept_inputs = [v for v in graph.input if v.name not in state]
    kept_outputs = [v for v in graph.output if v.name not in state]
    graph.ClearField("input")
    graph.input.extend(kept_inputs)
    graph.ClearField("output")
    graph.output.extend(kept_outputs)
    graph.initializer.extend(em.initializers)
    graph.ClearField("node")
    graph.node.extend(nodes)
    functions = {f.name: f for f in model.functions}
    for name, function in em.functions.items():
        if name in functions and functions[name].SerializeToString() != (
            function.SerializeToString()
        ):
            raise ValueError(f"the graph already has a different function {name!r}")
        functions[name] = function
    model.ClearField("functions")
    model.functions.extend(functions[name] for name in sorted(functions))
    # finalize's clean-up drops what is now dead: Dropout's constant feeds, the training
    # functions, the normport opset import when no function is left.
    return finalize(model, metadata)


def stateful_layers(model: onnx.ModelProto) -> list[StatefulLayer]:
    """See :func:`export.train_graph.stateful_layers`."""
    layers = []
    for node in model.graph.node:
        if node.domain != FUNCTION_DOMAIN or node.op_type not in REWRITES:
            continue
        call = TrainFunction(node.op_type)
        if call is TrainFunction.INSTANCENORM_FROZEN:
            momentum: float | None = 0.0
        elif call.value.endswith("Cumulative"):
            momentum = None
        else:
            momentum = float(_attrs(node)["momentum"])
        state = (node.input[3], node.input[4], node.input[5])
        layers.append(StatefulLayer(layer_path(node), call, momentum, state))
    return layers


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
