"""The Open Inference Protocol datatypes and their numpy, onnxruntime and Triton names.

One row per datatype; everything else (config ``TYPE_*`` names, onnxruntime's ``tensor(...)``
strings, wire sizes) is looked up here.

Internal representation of tensor data (what :mod:`runtime.serve.codec` produces and
:mod:`runtime.serve.session` feeds):

- numeric and BOOL: a numpy array of :attr:`DataType.numpy` (little-endian, as on the wire);
- BF16: ``uint16`` holding the raw bfloat16 bits (numpy has no bfloat16; onnxruntime takes the
  bits through ``OrtValue``, see :mod:`runtime.serve.session`);
- BYTES: an ``object`` array of ``str`` (onnxruntime string tensors must be fed ``str``; feeding
  ``bytes`` yields ``"b'..'"`` reprs), so BYTES data must be UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DATATYPES",
    "DataType",
    "from_ort_type",
    "from_triton_type",
]


@dataclass(frozen=True)
class DataType:
    """One v2 datatype.

    Attributes:
        name: the protocol name (``"FP32"``).
        triton: the ``config.pbtxt`` name (``"TYPE_FP32"``).
        ort: onnxruntime's type string (``"tensor(float)"``).
        numpy: the internal numpy dtype (``uint16`` for BF16, ``object`` for BYTES).
        itemsize: bytes per element on the wire; 0 for BYTES (variable length).
        floating: NaN and Inf are possible (and refused on input).
        json: the datatype can be carried as JSON numbers/strings in a request.
    """

    name: str
    triton: str
    ort: str
    numpy: np.dtype
    itemsize: int
    floating: bool = False
    json: bool = True


def _row(name: str, ort: str, numpy: type | str, **kw: bool) -> DataType:
    dtype = np.dtype(numpy)
    itemsize = 0 if dtype.kind == "O" else dtype.itemsize
    triton = f"TYPE_{'STRING' if name == 'BYTES' else name}"
    return DataType(name, triton, ort, dtype, itemsize, **kw)


DATATYPES: dict[str, DataType] = {
    t.name: t
    for t in (
        _row("BOOL", "tensor(bool)", np.bool_),
        _row("UINT8", "tensor(uint8)", np.uint8),
        _row("UINT16", "tensor(uint16)", np.uint16),
        _row("UINT32", "tensor(uint32)", np.uint32),
        _row("UINT64", "tensor(uint64)", np.uint64),
        _row("INT8", "tensor(int8)", np.int8),
        _row("INT16", "tensor(int16)", np.int16),
        _row("INT32", "tensor(int32)", np.int32),
        _row("INT64", "tensor(int64)", np.int64),
        _row("FP16", "tensor(float16)", np.float16, floating=True),
        _row("FP32", "tensor(float)", np.float32, floating=True),
        _row("FP64", "tensor(double)", np.float64, floating=True),
        # JSON numbers would have to be rounded to bfloat16; like Triton and tritonclient, BF16
        # inputs travel as binary data only.
        _row("BF16", "tensor(bfloat16)", np.uint16, floating=True, json=False),
        _row("BYTES", "tensor(string)", object),
    )
}
_BY_TRITON = {t.triton: t for t in DATATYPES.values()}
_BY_ORT = {t.ort: t for t in DATATYPES.values()}


def from_triton_type(triton: str) -> DataType:
    """The datatype of a config ``TYPE_*`` name; ValueError naming an unsupported one."""
    if triton not in _BY_TRITON:
        raise ValueError(f"unsupported data_type {triton} (supported: {', '.join(_BY_TRITON)})")
    return _BY_TRITON[triton]


def from_ort_type(ort: str) -> DataType:
    """The datatype of an onnxruntime type string; ValueError naming an unsupported one."""
    if ort not in _BY_ORT:
        raise ValueError(f"unsupported onnxruntime type {ort}")
    return _BY_ORT[ort]
