"""Infer request parsing and response building: JSON tensors and the binary tensor data extension.

Request body: a JSON header, then (when ``Inference-Header-Content-Length`` says where the
header ends) the raw blobs of the inputs that carry ``parameters.binary_data_size``, in the
order those inputs appear in the header.  Binary data is little-endian, row-major; BOOL is one
byte 0/1; BYTES elements are ``<u32 LE length><bytes>``.

Every problem is a :class:`~runtime.serve.errors.BadRequest` naming the model and the tensor.
A shape is admitted when it matches the config's ``dims``, each size is within the ONNX dim
range (``2**63 - 1``) and the model's bounds (:attr:`TensorSpec.min_dims` / ``max_dims``, from
``normport.{min,max}_shape.<input>``), and its nonzero dims span at most ``2**63 - 1`` bytes;
anything else would fail inside numpy or onnxruntime (a 500) instead of being refused here.
Decoded arrays come out in the internal representation of :mod:`runtime.serve.datatypes`,
shaped as the graph takes them (the config's ``reshape`` applied).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from normport.runtime.serve.datatypes import DataType
from normport.runtime.serve.errors import BadRequest
from normport.runtime.serve.spec import ModelSpec, TensorSpec

__all__ = [
    "InferRequest",
    "Plan",
    "RequestedOutput",
    "decode_request",
    "decode_with_plan",
    "encode_response",
]

_U32 = struct.Struct("<I")
# Triton parameters this service does not implement: refused, never silently ignored.
_UNSUPPORTED_REQUEST = ("sequence_id", "sequence_start", "sequence_end")
_UNSUPPORTED_TENSOR = ("shared_memory_region", "shared_memory_byte_size", "classification")
_NON_FINITE_BF16 = 0x7F80  # exponent bits all set: Inf or NaN
_INT64_MAX = 2**63 - 1  # the largest ONNX dim, and the most bytes numpy can address


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded request: graph-facing inputs, samples, the outputs wanted and how."""

    id: str | None
    inputs: dict[str, np.ndarray]
    batch_size: int
    outputs: tuple[RequestedOutput, ...]


def _clip(name: str, limit: int = 100) -> str:
    return name if len(name) <= limit else name[:limit] + "..."


def _where(spec: ModelSpec, tensor: str | None = None, kind: str = "input") -> str:
    return f"model '{spec.name}'" + (f", {kind} '{_clip(tensor)}'" if tensor is not None else "")


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    params = entry.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return params


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: parameter '{key}' must be true or false")
    return value


def _refuse_unsupported(params: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key in params:
            raise BadRequest(f"{where}: parameter '{key}' is not supported")


# -- request ---------------------------------------------------------------------------------


def decode_request(spec: ModelSpec, body: bytes, header_length: int | None) -> InferRequest:
    """Parse and validate one infer request against ``spec``.

    ``header_length`` is ``Inference-Header-Content-Length`` (None: the whole body is JSON).
    """
    return decode_with_plan(spec, body, header_length)[0]


@dataclass(frozen=True)
class _Entry:
    """One input as its header entry announced it, checked against the model: its tensor,
    client-facing shape, element count and ``binary_data_size`` (None: JSON ``data``)."""

    name: str
    tensor: TensorSpec
    shape: tuple[int, ...]
    count: int
    size: int | None
    where: str


@dataclass(frozen=True)
class Plan:
    """What a binary request's JSON header decides, once checked: everything but the values.
    The same header bytes make the same plan for the same model (:meth:`apply`)."""

    id: str | None
    entries: tuple[_Entry, ...]
    binary_bytes: int
    batch_size: int
    outputs: tuple[RequestedOutput, ...]

    def apply(self, spec: ModelSpec, binary: memoryview) -> InferRequest:
        """The request a body with this plan's header and ``binary`` after it decodes to, its
        values checked as :func:`decode_request` checks them (the caller checks that
        ``len(binary)`` is :attr:`binary_bytes`)."""
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for entry in self.entries:
            assert entry.size is not None  # a plan holds binary inputs only
            arrays[entry.name] = _binary_array(entry, binary[offset : offset + entry.size])
            offset += entry.size
        graph = {name: _graph_facing(spec.inputs, name, a) for name, a in arrays.items()}
        return InferRequest(self.id, graph, self.batch_size, self.outputs)


def decode_with_plan(
    spec: ModelSpec, body: bytes, header_length: int | None
) -> tuple[InferRequest, Plan | None]:
    """:func:`decode_request`, and the request's :class:`Plan` where every input is binary
    (None otherwise: JSON values live in the header)."""
    where = _where(spec)
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise BadRequest(
            f"{where}: Inference-Header-Content-Length {header_length} is not in "
            f"[1, {len(body)}] (the body size); raw binary requests are not supported"
        )
    try:
        doc = orjson.loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"{where}: malformed request JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{where}: the request must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"{where}: 'id' must be a string")
    params = _parameters(doc, where)
    _refuse_unsupported(params, _UNSUPPORTED_REQUEST, where)
    binary_default = _flag(params, "binary_data_output", False, where)
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise BadRequest(f"{where}: 'inputs' must be a non-empty list")
    binary = memoryview(body)[header_length:]
    inputs, checked = _decode_inputs(spec, entries, binary)
    batch_size = _batch_size(spec, inputs)
    arrays = {name: _graph_facing(spec.inputs, name, a) for name, a in inputs.items()}
    outputs = _outputs(spec, doc, binary_default)
    request = InferRequest(request_id, arrays, batch_size, outputs)
    if any(entry.size is None for entry in checked):
        return request, None
    return request, Plan(request_id, tuple(checked), len(binary), batch_size, outputs)


def _decode_inputs(
    spec: ModelSpec, entries: list[Any], binary: memoryview
) -> tuple[dict[str, np.ndarray], list[_Entry]]:
    """The client-facing arrays by name, and each input's checked header entry, in order."""
    declared = {t.name: t for t in spec.inputs}
    arrays: dict[str, np.ndarray] = {}
    checked: list[_Entry] = []
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(f"{_where(spec)}: every input needs a string 'name'")
        name = entry["name"]
        where = _where(spec, name)
        if name not in declared:
            raise BadRequest(
                f"{_where(spec)} has no input '{_clip(name)}' (inputs: {', '.join(declared)})"
            )
        if name in arrays:
            raise BadRequest(f"{where}: given twice")
        t = declared[name]
        shape = _check_header(spec, t, entry, where)
        count = math.prod(shape)
        params = _parameters(entry, where)
        _refuse_unsupported(params, _UNSUPPORTED_TENSOR, where)
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in entry:
                raise BadRequest(f"{where}: has both 'data' and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(f"{where}: binary_data_size must be an int >= 0")
            if offset + size > len(binary):
                raise BadRequest(
                    f"{where}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left after the JSON header)"
                )
            checked.append(_Entry(name, t, tuple(shape), count, size, where))
            arrays[name] = _binary_array(checked[-1], binary[offset : offset + size])
            offset += size
        elif "data" in entry:
            checked.append(_Entry(name, t, tuple(shape), count, None, where))
            array = _from_json(t.datatype, entry["data"], count, where).reshape(shape)
            _check_finite(t.datatype, array, where)
            arrays[name] = array
        else:
            raise BadRequest(f"{where}: has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise BadRequest(
            f"{_where(spec)}: {len(binary) - offset} bytes after the JSON header are not claimed "
            "by any input's binary_data_size (check Inference-Header-Content-Length)"
        )
    missing = [name for name in declared if name not in arrays]
    if missing:
        raise BadRequest(f"{_where(spec)}: missing input(s) {', '.join(map(repr, missing))}")
    return arrays, checked


def _binary_array(entry: _Entry, blob: memoryview) -> np.ndarray:
    """One input's values from its ``binary_data_size`` bytes, shaped and checked."""
    dt = entry.tensor.datatype
    array = _from_binary(dt, blob, entry.count, entry.where).reshape(entry.shape)
    _check_finite(dt, array, entry.where)
    return array


def _check_header(spec: ModelSpec, t: TensorSpec, entry: dict[str, Any], where: str) -> list[int]:
    datatype, shape = entry.get("datatype"), entry.get("shape")
    if datatype != t.datatype.name:
        raise BadRequest(f"{where}: datatype {datatype!r}, expected '{t.datatype.name}'")
    if not isinstance(shape, list) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
    ):
        raise BadRequest(f"{where}: 'shape' must be a list of ints >= 0, got {shape!r}")
    expected = [-1, *t.dims] if spec.batched else list(t.dims)
    if len(shape) != len(expected) or any(
        e != -1 and d != e for d, e in zip(shape, expected, strict=True)
    ):
        raise BadRequest(f"{where}: shape {shape} does not match {expected}")
    for axis, size in enumerate(shape):
        if size > _INT64_MAX:
            raise BadRequest(f"{where}: axis {axis} is {size}, over the largest ONNX dim 2**63 - 1")
    _check_bounds(t, shape, 1 if spec.batched else 0, where)
    # numpy sizes strides from the nonzero dims even when a dim is 0 (no elements): a shape
    # like [1, 0, 2**62] holds nothing yet cannot be made.
    span = math.prod(d for d in shape if d) * t.datatype.numpy.itemsize
    if span > _INT64_MAX:
        raise BadRequest(
            f"{where}: shape {shape} is too large: its nonzero dims span {span} bytes, over "
            "the 2**63 - 1 an array can address"
        )
    return shape


def _check_bounds(t: TensorSpec, shape: list[int], first: int, where: str) -> None:
    """The model's per-sample bounds; ``first`` is the client axis of the first per-sample dim."""
    for i, size in enumerate(shape[first:]):
        high = -1 if t.max_dims is None else t.max_dims[i]
        low = -1 if t.min_dims is None else t.min_dims[i]
        if high != -1 and size > high:
            raise BadRequest(f"{where}: axis {first + i} is {size}, the model takes at most {high}")
        if low != -1 and size < low:
            raise BadRequest(f"{where}: axis {first + i} is {size}, the model takes at least {low}")


def _from_binary(dt: DataType, blob: memoryview, count: int, where: str) -> np.ndarray:
    if dt.name == "BYTES":
        return _bytes_elements(blob, count, where)
    if len(blob) != count * dt.itemsize:
        raise BadRequest(
            f"{where}: {len(blob)} bytes of binary data, expected {count} elements x "
            f"{dt.itemsize} bytes = {count * dt.itemsize}"
        )
    if dt.name == "BOOL":
        raw = np.frombuffer(blob, dtype=np.uint8)
        if (raw > 1).any():
            raise BadRequest(f"{where}: BOOL bytes must be 0 or 1")
        return raw.view(np.bool_)
    return np.frombuffer(blob, dtype=dt.numpy.newbyteorder("<"))


def _bytes_elements(blob: memoryview, count: int, where: str) -> np.ndarray:
    if count * _U32.size > len(blob):  # checked before allocating: the shape is the client's
        raise BadRequest(
            f"{where}: {len(blob)} bytes cannot hold {count} BYTES elements (4 bytes or more each)"
        )
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(blob):
            raise BadRequest(f"{where}: BYTES data ends after {i} of {count} elements")
        (n,) = _U32.unpack_from(blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise BadRequest(f"{where}: BYTES element {i} runs past its binary_data_size")
        try:
            out[i] = str(blob[pos : pos + n], "utf-8")
        except UnicodeDecodeError:
            raise BadRequest(
                f"{where}: BYTES element {i} is not UTF-8 (onnxruntime strings are text)"
            ) from None
        pos += n
    if pos != len(blob):
        raise BadRequest(f"{where}: {len(blob) - pos} bytes left after {count} BYTES elements")
    return out


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_json(dt: DataType, data: Any, count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{where}: 'data' must be a (flat or nested) list")
    if not dt.json:
        raise BadRequest(f"{where}: {dt.name} data must be sent as binary (binary_data_size)")
    if dt.name == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"{where}: BYTES elements in JSON must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        array = _coerce(dt, _numbers(data, where), data, where)
    if array.size != count:
        raise BadRequest(f"{where}: {array.size} elements, the shape needs {count}")
    return array


def _numbers(data: list[Any], where: str) -> np.ndarray:
    """JSON numbers as the numpy array they make, flat; ragged nesting is flattened first."""
    for attempt in (data, None):
        try:
            return np.array(_flatten(data) if attempt is None else attempt).reshape(-1)
        except (ValueError, OverflowError, TypeError):
            continue
    raise BadRequest(f"{where}: 'data' holds values that are not numbers of one kind")


def _coerce(dt: DataType, array: np.ndarray, data: list[Any], where: str) -> np.ndarray:
    """JSON numbers (as numpy inferred them from ``data``) to ``dt``, refusing anything that
    would not fit: out-of-range integers, fractions for integer types, non-numbers."""
    kind = array.dtype.kind
    if array.size == 0:
        return array.astype(dt.numpy)
    if dt.name == "BOOL":
        if kind != "b":
            raise BadRequest(f"{where}: BOOL elements must be true or false")
        return array
    if dt.numpy.kind in "iu":
        if kind in "fO" and all(type(x) is int for x in _flatten(data)):
            # integers no single numpy dtype holds (e.g. UINT64 above 2**63 next to small ones)
            try:
                return np.array(_flatten(data), dtype=dt.numpy)
            except OverflowError:
                raise BadRequest(f"{where}: a value is out of range for {dt.name}") from None
        if kind not in "iu":
            raise BadRequest(f"{where}: {dt.name} elements must be integers")
        info = np.iinfo(dt.numpy)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise BadRequest(f"{where}: a value is out of range for {dt.name}")
        return array.astype(dt.numpy)
    if kind not in "iuf":
        raise BadRequest(f"{where}: {dt.name} elements must be numbers (null/NaN/Inf are not)")
    with np.errstate(over="ignore"):  # a value too big for the type becomes Inf: refused next
        return array.astype(dt.numpy)


def _check_finite(dt: DataType, array: np.ndarray, where: str) -> None:
    if not dt.floating or array.size == 0:
        return
    if dt.name == "BF16":
        finite = not ((array & _NON_FINITE_BF16) == _NON_FINITE_BF16).any()
    else:
        finite = bool(np.isfinite(array).all())
    if not finite:
        raise BadRequest(f"{where}: NaN or Inf values are not accepted")


def _batch_size(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> int:
    if not spec.batched:
        return 1
    sizes = {name: a.shape[0] for name, a in inputs.items()}
    batch = next(iter(sizes.values()))
    if len(set(sizes.values())) > 1:
        raise BadRequest(f"{_where(spec)}: inputs disagree on the batch size: {sizes}")
    if not 1 <= batch <= spec.max_batch_size:
        raise BadRequest(
            f"{_where(spec)}: batch size {batch} is not in [1, max_batch_size "
            f"{spec.max_batch_size}]"
        )
    return batch


def _graph_facing(tensors: tuple[TensorSpec, ...], name: str, array: np.ndarray) -> np.ndarray:
    t = next(t for t in tensors if t.name == name)
    if t.reshape is None:
        return array
    return array.reshape((*array.shape[: array.ndim - len(t.dims)], *t.reshape))


def _outputs(
    spec: ModelSpec, doc: dict[str, Any], binary_default: bool
) -> tuple[RequestedOutput, ...]:
    entries = doc.get("outputs")
    if entries is None:
        return tuple(RequestedOutput(t.name, binary_default) for t in spec.outputs)
    if not isinstance(entries, list):
        raise BadRequest(f"{_where(spec)}: 'outputs' must be a list")
    declared = {t.name for t in spec.outputs}
    wanted: dict[str, RequestedOutput] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(f"{_where(spec)}: every requested output needs a string 'name'")
        name = entry["name"]
        where = _where(spec, name, "output")
        if name not in declared:
            raise BadRequest(
                f"{_where(spec)} has no output '{_clip(name)}' "
                f"(outputs: {', '.join(sorted(declared))})"
            )
        if name in wanted:
            raise BadRequest(f"{where}: requested twice")
        params = _parameters(entry, where)
        _refuse_unsupported(params, _UNSUPPORTED_TENSOR, where)
        wanted[name] = RequestedOutput(name, _flag(params, "binary_data", binary_default, where))
    return tuple(wanted.values())


# -- response --------------------------------------------------------------------------------


def encode_response(
    spec: ModelSpec, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body and, when binary outputs follow the JSON, the JSON header's length."""
    declared = {t.name: t for t in spec.outputs}
    entries, blobs = [], []
    for wanted in request.outputs:
        t = declared[wanted.name]
        array = _client_facing(t, outputs[wanted.name], spec.batched)
        entry: dict[str, Any] = {
            "name": t.name,
            "datatype": t.datatype.name,
            "shape": list(array.shape),
        }
        if wanted.binary:
            blob = _to_binary(t.datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(t.datatype, array)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _client_facing(t: TensorSpec, array: np.ndarray, batched: bool) -> np.ndarray:
    if t.reshape is None:
        return array
    return array.reshape(([array.shape[0]] if batched else []) + list(t.dims))


def _to_binary(dt: DataType, array: np.ndarray) -> bytes | memoryview:
    if dt.name == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts += (_U32.pack(len(data)), data)
        return b"".join(parts)
    array = np.ascontiguousarray(array, dtype=dt.numpy.newbyteorder("<"))
    return array.data.cast("B")


def _to_json(dt: DataType, array: np.ndarray) -> Any:
    if dt.name == "BYTES":
        return [
            x if isinstance(x, str) else bytes(x).decode("utf-8", "replace") for x in array.flat
        ]
    if dt.name == "BF16":  # exact: every bfloat16 is a float32 with 16 zero low bits
        return (array.astype(np.uint32) << 16).view(np.float32).reshape(-1)
    return np.ascontiguousarray(array).reshape(-1)
