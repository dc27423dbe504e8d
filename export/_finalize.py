"""The last pass: readable names, no dead weights, provenance metadata, and the checks.

The graph clean-up is onnx_ir's passes (:func:`clean_up`): nodes, initializers, functions and
opset imports nothing uses go, and every node and value name is unique.
"""

from __future__ import annotations

import ast
import hashlib

import onnx
import onnx_ir as ir
import torch
from onnx import checker, shape_inference
from onnx_ir.passes.common import (
    NameFixPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)
from torch import nn

__all__ = ["clean_up", "finalize", "name_nodes", "weights_sha256"]

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


def clean_up(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without unused nodes, initializers, functions and opset imports, with unique
    node and value names (onnx_ir's passes)."""
    passes = ir.passes.PassManager(
        [
            RemoveUnusedNodesPass(),
            RemoveUnusedFunctionsPass(),
            RemoveUnusedOpsetsPass(),
            NameFixPass(),
        ]
    )
    return ir.serde.serialize_model(passes(ir.serde.deserialize_model(model)).model)


def finalize(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """Clean-up, metadata, then onnx's checker and strict, type-checked shape inference."""
    model = clean_up(model)
    graph = model.graph
    graph.ClearField("value_info")
    graph.doc_string = ""
    model.doc_string = ""
    model.producer_name = "normport"
    model.producer_version = metadata["normport_version"]
    model.ClearField("metadata_props")
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, metadata[key]
    # One serialization for both: the structural checks, then strict, type-checked inference
    # with data propagation (a superset of ``full_check``'s own inference pass, which would
    # serialize and infer a second time).
    data = model.SerializeToString()
    try:
        checker.check_model(data)
        shape_inference.infer_shapes(data, check_type=True, strict_mode=True, data_prop=True)
    except (checker.ValidationError, shape_inference.InferenceError) as err:
        raise ValueError(
            f"the exported graph fails onnx's checks at opset {metadata['opset']}: {err}"
        ) from err
    # The file keeps only the declared input / output types; runtimes infer the rest.
    return model
