"""normport export: every normalization layer as one standard ONNX op or one ONNX function.

>>> model = export.to_onnx(net, example_inputs, mode="eval", opset=23)
>>> export.save(model, "model_repository/net/1/model.onnx")

See :func:`export.api.to_onnx` for the options, :mod:`export.lowerings` for what each layer
becomes at each opset, and :mod:`export._lower` for the training graphs' state inputs/outputs.
"""

from normport.export import batch_mates
from normport.export._lower import state_names
from normport.export._opset import OpsetError
from normport.export._save import save
from normport.export.api import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, to_onnx, to_onnx_opsets

__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "OpsetError",
    "batch_mates",
    "save",
    "state_names",
    "to_onnx",
    "to_onnx_opsets",
]
