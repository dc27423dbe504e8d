"""The second runtime: ``onnx.reference.ReferenceEvaluator``, with one workaround.

onnx 1.23's reference ``BatchNormalization`` for opsets 9-13 fills in the default ``momentum``
and then takes its *training* branch (blending batch statistics into the running ones), although
BatchNormalization before opset 14 is inference-only.  Models at opset >= 14 pick the
BatchNormalization-14/15 implementation, which is correct; below 14 :class:`BatchNormalization`
here replaces it with the inference semantics the spec defines, in the graph and in every local
function (the evaluator builds a function's evaluator from its own class, without the caller's
``new_ops``: hence :class:`_Opset9BatchNorm`).  Remove it when the pinned onnx fixes its
BatchNormalization-9.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from normport.export import default_opset

__all__ = ["BatchNormalization", "reference"]

_FIXED_FROM = 14  # BatchNormalization-14 and later are right in onnx 1.23


class BatchNormalization(OpRun):
    """Inference BatchNormalization: ``(x - mean) / sqrt(var + epsilon) * scale + bias``."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=None, training_mode=0):
        if training_mode:
            raise NotImplementedError("BatchNormalization with training_mode=1 below opset 14")
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
        return ((y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype),)


class _Opset9BatchNorm(ReferenceEvaluator):
    """ReferenceEvaluator with :class:`BatchNormalization`, in its local functions too."""

    def __init__(self, proto: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("new_ops", [BatchNormalization])
        super().__init__(proto, *args, **kwargs)


def reference(model: onnx.ModelProto) -> ReferenceEvaluator:
    """A ReferenceEvaluator for ``model`` (its local functions included)."""
    if default_opset(model) < _FIXED_FROM:
        return _Opset9BatchNorm(model)
    return ReferenceEvaluator(model)
