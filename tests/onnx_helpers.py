"""Small helpers shared by the export tests: sessions, top-level structure, feeds."""

from __future__ import annotations

import numpy as np
import onnx

from normport.runtime.sessions import cpu_session as session

__all__ = ["close", "default_opset", "session", "top_level_ops"]


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
