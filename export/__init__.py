"""normport export: every normalization layer as one standard ONNX op or one ONNX function.

>>> from normport import export
>>> model = export.to_onnx(net, example_inputs, mode="eval", opset=23)
>>> export.save(model, "model_repository/net/1/model.onnx")

See :func:`export.api.to_onnx` for the options, :mod:`export.lowerings` for what each layer
becomes at each opset, and :mod:`export._lower` for the training graphs' state inputs/outputs.

Importing this package imports nothing else: each name below is loaded on first use, so the
torch-free parts (:mod:`export.triton_config`, the Triton repository contract the server reads)
import without torch, and no ONNX schema is registered until a model is exported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it ("" : the name is a submodule).
_LAZY = {
    "DEFAULT_OPSET": "api",
    "DEFAULT_TARGET": "api",
    "MAX_OPSET": "api",
    "MIN_OPSET": "api",
    "TARGETS": "api",
    "OpsetError": "_opset",
    "default_opset": "_opset",
    "batch_mates": "",
    "save": "_save",
    "state_names": "train_graph",
    "to_onnx": "api",
    "to_onnx_opsets": "api",
}

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TARGET",
    "MAX_OPSET",
    "MIN_OPSET",
    "TARGETS",
    "OpsetError",
    "batch_mates",
    "default_opset",
    "save",
    "state_names",
    "to_onnx",
    "to_onnx_opsets",
]

if TYPE_CHECKING:
    from normport.export import batch_mates
    from normport.export._opset import OpsetError, default_opset
    from normport.export._save import save
    from normport.export.api import (
        DEFAULT_OPSET,
        DEFAULT_TARGET,
        MAX_OPSET,
        MIN_OPSET,
        TARGETS,
        to_onnx,
        to_onnx_opsets,
    )
    from normport.export.train_graph import state_names


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"normport.export.{_LAZY[name] or name}")
    value = module if not _LAZY[name] else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
