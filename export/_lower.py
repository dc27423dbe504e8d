"""Replace every placeholder node by its lowering, and expose training state as graph I/O.

Training graphs expose each stateful layer's running statistics as graph inputs and ``.next``
outputs: the contract is :mod:`export.train_graph`.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from normport.export._emit import DEFAULT_TARGET, FUNCTION_DOMAIN, Emitter, Inputs
from normport.export._placeholder import DOMAIN, TENSOR_NAMES, LayerSpec
from normport.export.lowerings import lowering_for
from normport.export.train_graph import state_names

__all__ = ["lower"]


def _spec(node: onnx.NodeProto) -> LayerSpec:
    for attr in node.attribute:
        if attr.name == "spec":
            return LayerSpec.from_json(attr.s.decode())
    raise RuntimeError(f"placeholder {node.name!r} has no spec")


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def lower(
    model: onnx.ModelProto, opset: int, elem_type: int, *, target: str = DEFAULT_TARGET
) -> list[tuple[LayerSpec, str]]:
    """Lower all placeholders of ``model`` in place, each layer in the form the form table
    gives ``target`` (:mod:`export.lowerings._choices`).

    Returns, per lowered layer, its spec and the node its output comes from: the standard op
    (``BatchNormalization``), ``normport.<function>``, or ``Mul+Add`` for a folded form.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    em = Emitter(
        opset,
        elem_type,
        taken=_all_names(graph),
        initializer_values={name: numpy_helper.to_array(t) for name, t in initializers.items()},
        target=target,
    )
    nodes: list[onnx.NodeProto] = []
    specs: list[LayerSpec] = []
    made: list[str] = []
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        spec = _spec(node)
        names = list(node.input) + [""] * (len(TENSOR_NAMES) - len(node.input))
        outs = list(node.output)
        if spec.update_stats:  # one update per layer: export.recognize checked it
            names[3:6], outs[1:4] = _expose_state(graph, em, initializers, spec, names[3:6])
        em.nodes = []
        lowering_for(spec).lower(em, spec, Inputs(*names), outs)
        nodes.extend(em.nodes)
        specs.append(spec)
        made.append(_made(em.nodes, outs[0]))
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(em.initializers)
    model.functions.extend(em.functions[name] for name in sorted(em.functions))
    imports = [o for o in model.opset_import if o.domain != DOMAIN]
    if em.functions:
        imports.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
    model.ClearField("opset_import")
    model.opset_import.extend(imports)
    return list(zip(specs, made, strict=True))


def _made(nodes: list[onnx.NodeProto], output: str) -> str:
    last = next(n for n in nodes if output in n.output)
    if last.domain == FUNCTION_DOMAIN:
        return f"{FUNCTION_DOMAIN}.{last.op_type}"
    if last.op_type == "Add" and any(n.op_type == "Mul" for n in nodes):
        return "Mul+Add"
    return last.op_type


def _expose_state(
    graph: onnx.GraphProto,
    em: Emitter,
    initializers: dict[str, onnx.TensorProto],
    spec: LayerSpec,
    current: list[str],
) -> tuple[list[str], list[str]]:
    """Give one layer's statistics their own initializer-backed inputs and named outputs.

    The exporter shares equal constants between layers (two fresh BatchNorms have identical
    running statistics), so each layer gets a private copy under its canonical name.
    """
    inputs, outputs = [], []
    for source, (name, next_name) in zip(current, state_names(spec.path), strict=True):
        if name != source:
            if name in em.taken and name not in initializers:
                raise RuntimeError(f"state name {name!r} is already used in the graph")
            tensor = onnx.TensorProto()
            tensor.CopyFrom(initializers[source])
            tensor.name = name
            graph.initializer.append(tensor)
            initializers[name] = tensor
            em.taken.add(name)
        tensor = initializers[name]
        graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
        graph.output.append(helper.make_tensor_value_info(next_name, tensor.data_type, tensor.dims))
        em.taken.add(next_name)
        inputs.append(name)
        outputs.append(next_name)
    return inputs, outputs
