"""A normport training graph -> the inference graph, with given running statistics.

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
table is keyed by function name: a training function not in it raises, naming the node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from normport.export._emit import FUNCTION_DOMAIN, Emitter, Inputs
from normport.export._finalize import finalize
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import lowering_for
from normport.runtime._recalibration_feeds import state_pairs

__all__ = ["REWRITES", "to_eval"]

_RUNNING_MEAN = "running_mean"
_REQUIRED_METADATA = ("normport_version", "opset", "mode")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _path(node: onnx.NodeProto) -> str:
    """The layer's module path, from its ``<path>.running_mean`` input (see export._lower)."""
    name = node.input[3]
    if name == _RUNNING_MEAN:
        return ""
    if not name.endswith("." + _RUNNING_MEAN):
        raise ValueError(
            f"node {node.name!r} ({node.op_type}): input 3 should be '<path>.running_mean', "
            f"got {name!r}; is this a normport training export?"
        )
    return name[: -len("." + _RUNNING_MEAN)]


def _spec(kind: str, cls: str, node: onnx.NodeProto, rank: int, channels: int) -> LayerSpec:
    return LayerSpec(
        kind=kind,
        path=_path(node),
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

REWRITES: dict[str, Rewrite] = {
    "BatchNormTrain": _batchnorm,
    "BatchNormTrainCumulative": _batchnorm,
    "InstanceNormTrain": _instancenorm,
    "InstanceNormTrainFrozen": _instancenorm,
    "SwitchableNormTrain": _switchable,
    "SwitchableNormTrainCumulative": _switchable,
}


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


def _live_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes that contribute to a graph output (dead Constant feeds of Dropout go)."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]


def _used_functions(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> set[str]:
    bodies = {f.name: f for f in model.functions}
    used: set[str] = set()
    todo = [n.op_type for n in nodes if n.domain == FUNCTION_DOMAIN]
    while todo:
        name = todo.pop()
        if name in used or name not in bodies:
            continue
        used.add(name)
        todo += [n.op_type for n in bodies[name].node if n.domain == FUNCTION_DOMAIN]
    return used


def _metadata(model: onnx.ModelProto, batches: int, method: str | None) -> dict[str, str]:
    metadata = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing or metadata["mode"] != "train":
        raise ValueError(
            "not a normport training export: expected metadata mode='train' (got "
            f"{metadata.get('mode')!r}); missing keys {missing}"
        )
    metadata["mode"] = "eval"
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
    """The inference graph of ``train_model`` with ``statistics`` as its running statistics.

    Args:
        train_model: a normport training export (``export.to_onnx(..., mode="train")``, not
            inlined: the rewrite finds the layers by their function calls).
        statistics: a value for every state input (``<path>.running_mean``, ...).
        batches: how many batches produced them (recorded in the metadata).
        method: how they were estimated (``precise`` / ``ema``; recorded if given).

    Raises:
        ValueError: not a normport training graph, missing statistics, or a node with no
            inference rewrite (named).
    """
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
    running_mean = next((initializers[n] for n, _ in pairs if n.endswith(_RUNNING_MEAN)), None)
    elem_type = running_mean.data_type if running_mean is not None else onnx.TensorProto.FLOAT
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {v.name for v in graph.output} | {n.name for n in graph.node}
    taken |= {o for n in graph.node for o in (*n.input, *n.output)}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
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
    nodes = _live_nodes(graph, nodes)
    graph.ClearField("node")
    graph.node.extend(nodes)
    functions = {f.name: f for f in model.functions}
    for name, function in em.functions.items():
        if name in functions and functions[name].SerializeToString() != (
            function.SerializeToString()
        ):
            raise ValueError(f"the graph already has a different function {name!r}")
        functions[name] = function
    used = _used_functions(model, nodes) | {n for n in em.functions}
    model.ClearField("functions")
    model.functions.extend(functions[name] for name in sorted(used))
    if not model.functions:
        kept = [o for o in model.opset_import if o.domain != FUNCTION_DOMAIN]
        model.ClearField("opset_import")
        model.opset_import.extend(kept)
    return finalize(model, metadata)
