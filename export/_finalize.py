"""The last pass: readable names, no dead weights, provenance metadata, and the checks."""

from __future__ import annotations

import ast
import hashlib

import onnx
import torch
from onnx import checker, shape_inference
from torch import nn

__all__ = ["finalize", "name_nodes", "weights_sha256"]

_SCOPES = "pkg.torch.onnx.name_scopes"


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _scope(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    return None


def name_nodes(model: onnx.ModelProto) -> None:
    """``<module path>/<op>`` for traced nodes: names a viewer can group by module.

    Runs right after tracing, while the exporter's scope metadata is still there (version
    conversion drops it); the stack traces in that metadata are not kept.
    """
    for node in model.graph.node:
        scope = _scope(node)
        node.name = f"{scope}/{node.op_type}" if scope else node.op_type
        node.ClearField("metadata_props")
        node.doc_string = ""


def _unique_names(graph: onnx.GraphProto) -> None:
    used: set[str] = set()
    for node in graph.node:
        base = node.name or node.op_type
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        node.name = name


def _prune_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used.update(o.name for o in graph.output)
    used.update(i.name for i in graph.input)
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def finalize(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """Names, pruning, metadata, then ``check_model(full_check=True)`` and strict inference."""
    graph = model.graph
    _unique_names(graph)
    _prune_initializers(graph)
    graph.ClearField("value_info")
    graph.doc_string = ""
    model.doc_string = ""
    model.producer_name = "normport"
    model.producer_version = metadata["normport_version"]
    model.ClearField("metadata_props")
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, metadata[key]
    try:
        inferred = shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
        checker.check_model(inferred, full_check=True)
    except (checker.ValidationError, shape_inference.InferenceError) as err:
        raise ValueError(
            f"the exported graph fails onnx's checks at opset {metadata['opset']}: {err}"
        ) from err
    # The file keeps only the declared input / output types; runtimes infer the rest.
    return model
