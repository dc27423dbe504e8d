"""The test model repository: four zoo exports, small hand-made models (one per datatype, a
two-input model, versions, a reshape, no batching, external data) and broken models.

Every hand-made graph is built with ``onnx.helper``; ``REFERENCE`` runs any of them directly in
onnxruntime (the oracle the served results must equal bit for bit).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from normport import export
from normport.export import triton_config
from normport.export.repository import build_config, write_model
from normport.models import zoo

__all__ = ["BROKEN", "DATATYPES", "ZOO", "build_repository", "reference_run"]

ZOO = ("cnn_bn", "seq_bn", "transformer_ln", "llm_rms")  # the last two: seq_len <= 64
OPSET = 21
MAX_BATCH = 8

# v2 datatype -> (ONNX element type, numpy dtype as tritonclient sends it)
DATATYPES: dict[str, tuple[int, np.dtype]] = {
    name: (elem, np.dtype(dtype))
    for name, elem, dtype in (
        ("BOOL", TensorProto.BOOL, np.bool_),
        ("UINT8", TensorProto.UINT8, np.uint8),
        ("UINT16", TensorProto.UINT16, np.uint16),
        ("UINT32", TensorProto.UINT32, np.uint32),
        ("UINT64", TensorProto.UINT64, np.uint64),
        ("INT8", TensorProto.INT8, np.int8),
        ("INT16", TensorProto.INT16, np.int16),
        ("INT32", TensorProto.INT32, np.int32),
        ("INT64", TensorProto.INT64, np.int64),
        ("FP16", TensorProto.FLOAT16, np.float16),
        ("FP32", TensorProto.FLOAT, np.float32),
        ("FP64", TensorProto.DOUBLE, np.float64),
        ("BF16", TensorProto.BFLOAT16, ml_dtypes.bfloat16),
        ("BYTES", TensorProto.STRING, np.object_),
    )
}

# folder name -> the reason regex the repository index must show
BROKEN = {
    "broken_truncated": r"corrupt or truncated model file",
    "broken_external": r"external data '\.\./\.\./\.\./etc/passwd' of tensor 'w' resolves outside",
    "broken_config": r"ValueError: .*line 1",
    "broken_mismatch": r"input 'x': config says TYPE_INT64, the graph has TYPE_FP32",
}


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


def _tensor(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def identity(elem: int) -> onnx.ModelProto:
    """``y = x`` for one datatype, shape ``[batch, 3]``."""
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [_tensor("x", elem, ["batch", 3])],
        [_tensor("y", elem, ["batch", 3])],
    )


def affine(offset: float, shape: list, name: str = "w") -> onnx.ModelProto:
    """``y = x + w`` in FP32, ``w`` an initializer filled with ``offset``."""
    w = numpy_helper.from_array(np.full(shape[1:], offset, np.float32), name)
    return _model(
        [helper.make_node("Add", ["x", name], ["y"])],
        [_tensor("x", TensorProto.FLOAT, shape)],
        [_tensor("y", TensorProto.FLOAT, shape)],
        [w],
    )


def pair() -> onnx.ModelProto:
    """Two inputs, two outputs: ``sum = a + b``, ``diff = a - b`` (FP32 ``[batch, 4]``)."""
    io = [["batch", 4]] * 2
    return _model(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["diff"]),
        ],
        [_tensor(n, TensorProto.FLOAT, s) for n, s in zip("ab", io, strict=True)],
        [_tensor(n, TensorProto.FLOAT, s) for n, s in zip(("sum", "diff"), io, strict=True)],
    )


def scalar() -> onnx.ModelProto:
    """One scalar per sample (``[batch]``): the config says ``dims: [1] reshape: { shape: [] }``."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    return _model(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [_tensor("x", TensorProto.FLOAT, ["batch"])],
        [_tensor("y", TensorProto.FLOAT, ["batch"])],
        [two],
    )


def _write_version(root: Path, name: str, version: str, model: onnx.ModelProto) -> Path:
    path = root / name / version / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, os.fspath(path))
    return path


def _external(root: Path, name: str, location: str) -> None:
    """``y = x + w`` with ``w`` in an external data file at ``location`` (relative to 1/)."""
    model = affine(0.5, ["batch", 4])
    write_model(root, name, model, max_batch_size=MAX_BATCH)
    folder = root / name / "1"
    onnx.save_model(
        model,
        os.fspath(folder / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    if location != "weights.bin":  # point the tensor elsewhere, as an attacker would
        model = onnx.load(os.fspath(folder / "model.onnx"), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(model, os.fspath(folder / "model.onnx"))


def export_zoo(root: Path, name: str, *, max_batch_size: int = 64) -> None:
    """Export zoo network ``name`` (eval, opset 23) into ``root`` as the server will read it."""
    spec = zoo.get(name)
    model = export.to_onnx(
        spec.build(),
        spec.example_inputs(4),
        mode="eval",
        opset=23,
        dynamic=spec.dynamic_dims,
        input_names=spec.input_names,
        output_names=spec.output_names,
    )
    write_model(root, name, model, max_batch_size=max_batch_size)  # 100 us queue delay


def _zoo(root: Path) -> None:
    for name in ZOO:
        export_zoo(root, name)


def _broken(root: Path) -> None:
    cnn = (root / "cnn_bn" / "1" / "model.onnx").read_bytes()
    truncated = root / "broken_truncated"
    (truncated / "1").mkdir(parents=True)
    (truncated / "1" / "model.onnx").write_bytes(cnn[: len(cnn) // 2])
    config = (root / "cnn_bn" / "config.pbtxt").read_text()
    (truncated / "config.pbtxt").write_text(config.replace('"cnn_bn"', '"broken_truncated"'))

    _external(root, "broken_external", "../../../etc/passwd")  # out of the repository

    (root / "broken_config" / "1").mkdir(parents=True)
    (root / "broken_config" / "config.pbtxt").write_text("name: broken_config {{{\n")
    _write_version(root, "broken_config", "1", identity(TensorProto.FLOAT))

    model = identity(TensorProto.FLOAT)
    config = build_config("broken_mismatch", identity(TensorProto.INT64), max_batch_size=MAX_BATCH)
    _write_version(root, "broken_mismatch", "1", model)
    (root / "broken_mismatch" / "config.pbtxt").write_text(triton_config.to_text(config))


def build_repository(root: Path, *, with_zoo: bool = True) -> Path:
    """Write every test model under ``root``; returns ``root``."""
    if with_zoo:
        _zoo(root)
    for datatype, (elem, _) in DATATYPES.items():
        write_model(root, f"t_{datatype.lower()}", identity(elem), max_batch_size=MAX_BATCH)
    write_model(root, "pair", pair(), max_batch_size=MAX_BATCH, max_queue_delay_microseconds=0)
    write_model(root, "scalar", scalar(), max_batch_size=MAX_BATCH)
    write_model(root, "nobatch", affine(1.0, [2, 3]), max_batch_size=0)
    write_model(root, "versioned", affine(1.0, ["batch", 2]), max_batch_size=MAX_BATCH)
    _write_version(root, "versioned", "2", affine(2.0, ["batch", 2]))
    _external(root, "external_ok", "weights.bin")
    if with_zoo:
        _broken(root)
    return root


@functools.cache
def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def reference_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``path`` directly in onnxruntime (the server's session options); BF16 via OrtValue,
    strings as ``str``.  Outputs by name; BF16 outputs as ``ml_dtypes.bfloat16``."""
    session = _session(os.fspath(path))
    names = [o.name for o in session.get_outputs()]
    if not any(a.dtype == ml_dtypes.bfloat16 for a in feeds.values()):
        return dict(zip(names, session.run(names, feeds), strict=True))
    values = {
        k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(np.uint16), TensorProto.BFLOAT16)
        for k, v in feeds.items()
    }
    out = {}
    for name, value in zip(names, session.run_with_ort_values(names, values), strict=True):
        bits = np.empty(value.shape(), np.uint16)
        ctypes.memmove(bits.ctypes.data, value.data_ptr(), bits.nbytes)
        out[name] = bits.view(ml_dtypes.bfloat16)
    return out
