"""Small helpers shared by the export tests: sessions, top-level structure, feeds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # initializer-backed state inputs warn by design
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def top_level_ops(model: onnx.ModelProto) -> list[str]:
    return [
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        for n in model.graph.node
    ]


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def close(
    actual: np.ndarray, expected: np.ndarray, what: str, atol: float = 1e-5, rtol: float = 1e-5
) -> None:
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)
