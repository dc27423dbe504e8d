"""Triton Inference Server model repository: ``<root>/<name>/{config.pbtxt, 1/model.onnx}``.

>>> write_model("model_repository", "cnn_bn", export.to_onnx(net, x, mode="eval"))
>>> read_config("model_repository/cnn_bn")["inputs"]
[{'name': 'image', 'data_type': 'TYPE_FP32', 'dims': [3, -1, -1], 'reshape': None}]

With ``max_batch_size > 0`` (the default) axis 0 of every graph input and output must be one
symbolic batch dimension; ``dims`` leave it out and a ``dynamic_batching`` block is written,
unless the caller says a sample's outputs depend on its batch-mates (``dynamic_batching=False``
or the reason: then the reason goes into ``#`` comments and clients still send their own
batches).
``max_batch_size=0`` (no batching: e.g. training graphs, whose batch statistics must not mix
requests and whose running statistics have no batch axis) lists full shapes instead.  Symbolic
dimensions are written as ``-1``; a tensor whose listed shape would be empty is written as
``dims: [ 1 ] reshape: { shape: [ ] }`` (Triton requires non-empty ``dims``).

:func:`read_config` parses exactly this subset back into the dict :func:`build_config` returns.

Shape bounds.  A graph may take only some sizes of a dynamic dim: a position table of 64 rows
takes at most 64 tokens (:mod:`export._bounds` records such bounds in the model's
``normport.dim_bounds`` metadata).  :func:`build_config` writes them as Triton ``parameters``,
which Triton ignores and the normport server enforces (a 400 naming the input, the axis, the
size and the bound, instead of onnxruntime failing inside the graph).  ``transformer_ln``,
whose ``tokens`` are ``[batch, seq_len]`` (``dims: [ -1 ]``) with ``seq_len <= 64``, gets::

    parameters {
      key: "normport.max_shape.tokens"
      value: { string_value: "[64]" }
    }

Keys: ``normport.max_shape.<input>`` (largest size of each axis) and
``normport.min_shape.<input>`` (smallest), for an input of the config, each at most once.
Value: a JSON list of ints, one per entry of that input's ``dims`` (so per sample: no batch
axis when ``max_batch_size > 0``, which bounds the batch), ``-1`` where the axis has no such
bound; bounds are inclusive, and a fixed dim's entry is ``-1`` or that dim.  Only inputs with
a bound get a key.  A hand-written config may set them too (the server checks them when it
loads the model: see :mod:`runtime.serve.spec`).  Other ``normport.*`` keys are refused
(:data:`NORMPORT_KEYS` lists the model-wide ones); every other key (Triton's own, e.g.
``execution_mode``) is kept and ignored.  ``config["parameters"]`` is ``{key: string_value}``.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from normport.export._bounds import Bounds, read_dim_bounds
from normport.export._pbtxt import Enum, Field, Message, parse, quote
from normport.export._save import atomic_write, save

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_PREFERRED_BATCH_SIZES",
    "MAX_SHAPE",
    "MIN_SHAPE",
    "MODEL_NAME",
    "NORMPORT_KEYS",
    "PLATFORM",
    "TRITON_TYPES",
    "VERSION",
    "build_config",
    "format_config",
    "parse_config",
    "read_config",
    "triton_type",
    "write_model",
]

PLATFORM = "onnxruntime_onnx"
CONFIG_NAME = "config.pbtxt"
MODEL_NAME = "model.onnx"
VERSION = "1"
DEFAULT_PREFERRED_BATCH_SIZES = (16, 32, 64)  # those <= max_batch_size are used
MAX_SHAPE = "normport.max_shape."  # + an input's name: parameter key of its per-sample maxima
MIN_SHAPE = "normport.min_shape."  # + an input's name: ... of its minima
# The model-wide normport parameter keys (read by runtime.serve.admission).
NORMPORT_KEYS = ("normport.memory_budget",)

_T = onnx.TensorProto
TRITON_TYPES: dict[int, str] = {
    _T.BOOL: "TYPE_BOOL",
    _T.UINT8: "TYPE_UINT8",
    _T.UINT16: "TYPE_UINT16",
    _T.UINT32: "TYPE_UINT32",
    _T.UINT64: "TYPE_UINT64",
    _T.INT8: "TYPE_INT8",
    _T.INT16: "TYPE_INT16",
    _T.INT32: "TYPE_INT32",
    _T.INT64: "TYPE_INT64",
    _T.FLOAT16: "TYPE_FP16",
    _T.BFLOAT16: "TYPE_BF16",
    _T.FLOAT: "TYPE_FP32",
    _T.DOUBLE: "TYPE_FP64",
    _T.STRING: "TYPE_STRING",
}

Config = dict[str, Any]


def triton_type(elem_type: int, tensor: str = "?") -> str:
    """The Triton ``TYPE_*`` name of an ONNX element type; ValueError naming an unmapped one."""
    if elem_type not in TRITON_TYPES:
        onnx_name = _T.DataType.Name(elem_type) if elem_type in _T.DataType.values() else elem_type
        raise ValueError(
            f"tensor {tensor!r} has ONNX element type {onnx_name}, which has no Triton "
            f"TYPE_* (supported: {', '.join(_T.DataType.Name(t) for t in TRITON_TYPES)})"
        )
    return TRITON_TYPES[elem_type]


def _tensor(value: onnx.ValueInfoProto, kind: str, batch: list[str] | None) -> dict[str, Any]:
    """One config tensor; ``batch`` collects the batch symbol (None: no batching)."""
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not ttype.HasField("shape"):
        raise ValueError(f"{kind} {value.name!r} is not a tensor of known rank")
    shape = list(ttype.shape.dim)
    if batch is not None:
        symbol = shape[0].dim_param if shape else ""
        if not symbol or (batch and symbol != batch[0]):
            axis0 = "none (a scalar)" if not shape else (symbol or shape[0].dim_value or "?")
            expected = repr(batch[0]) if batch else "a symbolic batch dimension"
            raise ValueError(
                f"{kind} {value.name!r}: axis 0 is {axis0}, expected {expected}; Triton batches "
                "every input and output along axis 0 (use max_batch_size=0 for no batching)"
            )
        if not batch:
            batch.append(symbol)  # the first tensor names the batch symbol for all others
        shape = shape[1:]
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in shape]
    return {
        "name": value.name,
        "data_type": triton_type(ttype.elem_type, value.name),
        "dims": dims or [1],
        "reshape": None if dims else [],
    }


def _preferred(max_batch_size: int, preferred: Sequence[int] | None) -> list[int]:
    if preferred is None:
        return [s for s in DEFAULT_PREFERRED_BATCH_SIZES if s <= max_batch_size] or [max_batch_size]
    sizes = list(preferred)
    if any(
        isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= max_batch_size for s in sizes
    ):
        raise ValueError(
            f"preferred batch sizes must be ints in [1, {max_batch_size}], got {sizes}"
        )
    return sorted(set(sizes))


def build_config(
    name: str,
    model: onnx.ModelProto,
    *,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_microseconds: int = 100,
    dynamic_batching: bool | str = True,
) -> Config:
    """The config of ``model`` served as ``name``, as :func:`read_config` returns it.

    The graph's dim bounds (``normport.dim_bounds`` metadata) become ``parameters`` (see the
    module docstring).

    ``dynamic_batching`` is the caller's decision (``python -m export`` measures it with
    :func:`export.batch_mates.measure`): True writes a ``dynamic_batching`` block when
    ``max_batch_size > 0``; False, or a reason (a string: why a sample's outputs depend on its
    batch-mates), writes none, while ``max_batch_size`` still lets a client send its own batch.
    :func:`write_model` writes the reason as ``#`` comments.

    Raises:
        ValueError: a bad name or batching option, a tensor without a Triton type or of unknown
            rank, (``max_batch_size > 0``) a tensor whose axis 0 is not the batch dimension or a
            batch dimension the graph bounds below ``[1, max_batch_size]``, or bad metadata.
    """
    if not name or name in (".", "..") or any(c in name for c in "/\\\0\n"):
        raise ValueError(f"model name must be a plain folder name, got {name!r}")
    options = {
        "max_batch_size": max_batch_size,
        "max_queue_delay_microseconds": max_queue_delay_microseconds,
    }
    for option, n in options.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{option} must be an int >= 0, got {n!r}")
    if max_batch_size == 0 and preferred_batch_sizes:
        raise ValueError("preferred_batch_sizes needs max_batch_size > 0")
    if not isinstance(dynamic_batching, bool | str) or dynamic_batching == "":
        raise ValueError(
            f"dynamic_batching must be True, False or a non-empty reason, got {dynamic_batching!r}"
        )
    batching = dynamic_batching is True and max_batch_size > 0
    batch: list[str] | None = [] if max_batch_size > 0 else None
    graph = model.graph
    inputs = [_tensor(v, "input", batch) for v in graph.input]
    outputs = [_tensor(v, "output", batch) for v in graph.output]
    bounds = read_dim_bounds(model)
    if batch:
        _check_batch_bounds(bounds.get(batch[0], {}), batch[0], max_batch_size)
    return {
        "name": name,
        "platform": PLATFORM,
        "max_batch_size": max_batch_size,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_batching": None
        if not batching
        else {
            "preferred_batch_size": _preferred(max_batch_size, preferred_batch_sizes),
            "max_queue_delay_microseconds": max_queue_delay_microseconds,
        },
        "parameters": _shape_parameters(graph.input, bounds, batched=batch is not None),
    }


def _check_batch_bounds(bound: dict[str, int], symbol: str, max_batch_size: int) -> None:
    """Triton sends batches of 1 to ``max_batch_size``: the graph must take all of them."""
    if bound.get("max", max_batch_size) < max_batch_size:
        raise ValueError(
            f"the graph takes at most {bound['max']} on its batch dim {symbol!r}: use "
            f"max_batch_size <= {bound['max']} (got {max_batch_size})"
        )
    if bound.get("min", 1) > 1:
        raise ValueError(
            f"the graph takes at least {bound['min']} on its batch dim {symbol!r}, but a batch "
            "may hold one request: use max_batch_size=0"
        )


def _shape_parameters(
    inputs: Sequence[onnx.ValueInfoProto], bounds: Bounds, *, batched: bool
) -> dict[str, str]:
    """``normport.{min,max}_shape.<input>`` of every input with a bounded per-sample dim.

    A bound on a dim that no input keeps symbolic needs no parameter: ``dims`` fix that dim.
    """
    parameters: dict[str, str] = {}
    for value in inputs:
        dims = list(value.type.tensor_type.shape.dim)[1 if batched else 0 :]
        for prefix, end in ((MAX_SHAPE, "max"), (MIN_SHAPE, "min")):
            row = [bounds.get(d.dim_param, {}).get(end, -1) if d.dim_param else -1 for d in dims]
            if any(b != -1 for b in row):
                parameters[prefix + value.name] = json.dumps(row)
    return parameters


def _ints(values: Sequence[int]) -> str:
    return "[ " + ", ".join(map(str, values)) + " ]" if values else "[ ]"


def _wrap(text: str, width: int = 96) -> list[str]:
    """``text``'s lines, each wrapped at spaces to ``width`` (a long word stays whole)."""
    return [
        part
        for line in text.splitlines()
        for part in textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False)
        or [""]
    ]


def format_config(config: Config, comment: str | None = None) -> str:
    """``config`` (as :func:`build_config` returns it) in protobuf text format.

    ``comment`` (any text) is written as ``#`` lines after the header comment; parsers (Triton's,
    :func:`parse_config`) skip them.
    """
    lines = [
        "# Triton Inference Server model configuration, written by normport export.repository.",
        *(f"# {line}".rstrip() for line in _wrap(comment or "")),
        f"name: {quote(config['name'])}",
        f"platform: {quote(config['platform'])}",
        f"max_batch_size: {config['max_batch_size']}",
    ]
    for field, key in (("input", "inputs"), ("output", "outputs")):
        blocks = []
        for t in config[key]:
            block = [
                f"    name: {quote(t['name'])}",
                f"    data_type: {t['data_type']}",
                f"    dims: {_ints(t['dims'])}",
            ]
            if t["reshape"] is not None:
                block.append(f"    reshape: {{ shape: {_ints(t['reshape'])} }}")
            blocks.append("  {\n" + "\n".join(block) + "\n  }")
        lines.append(f"{field} [\n" + ",\n".join(blocks) + "\n]")
    batching = config["dynamic_batching"]
    if batching is not None:
        lines.append("dynamic_batching {")
        if batching["preferred_batch_size"]:
            lines.append(f"  preferred_batch_size: {_ints(batching['preferred_batch_size'])}")
        lines.append(f"  max_queue_delay_microseconds: {batching['max_queue_delay_microseconds']}")
        lines.append("}")
    for key, value in config.get("parameters", {}).items():
        lines.append("parameters {")
        lines.append(f"  key: {quote(key)}")
        lines.append(f"  value: {{ string_value: {quote(value)} }}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def write_model(
    root: str | os.PathLike,
    name: str,
    model: onnx.ModelProto,
    *,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_microseconds: int = 100,
    dynamic_batching: bool | str = True,
) -> Path:
    """Write ``root/name/1/model.onnx`` and ``root/name/config.pbtxt`` (both atomically).

    ``preferred_batch_sizes=None`` uses those of :data:`DEFAULT_PREFERRED_BATCH_SIZES` that fit
    (or ``[max_batch_size]``); ``()`` leaves the field out.  ``dynamic_batching``: see
    :func:`build_config`; a reason is written into ``config.pbtxt`` as ``#`` comments.  Nothing
    is written when the config is invalid (see :func:`build_config` for the errors).  Files get
    the umask's mode (0644 under umask 022), created folders 0777 less the umask.  Returns
    ``root/name``.
    """
    config = build_config(
        name,
        model,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_microseconds=max_queue_delay_microseconds,
        dynamic_batching=dynamic_batching,
    )
    comment = None
    if isinstance(dynamic_batching, str) and max_batch_size > 0:
        comment = f"No dynamic_batching: {dynamic_batching}"
    folder = Path(root) / name
    save(model, folder / VERSION / MODEL_NAME)  # the model first: a config never dangles
    atomic_write(folder / CONFIG_NAME, format_config(config, comment).encode("utf-8"))
    return folder


# -- reading ---------------------------------------------------------------------------------

_TOP = ("name", "platform", "max_batch_size", "input", "output", "dynamic_batching", "parameters")
_TENSOR = ("name", "data_type", "dims", "reshape")
_BATCHING = ("preferred_batch_size", "max_queue_delay_microseconds")
_MISSING = object()
_KINDS: tuple[tuple[type, str], ...] = (  # Enum before its base class str
    (Enum, "an identifier"),
    (str, "a quoted string"),
    (int, "an integer"),
    (list, "a list"),
    (Message, "a '{ }' block"),
)


def _kind(kind: type) -> str:
    return next(name for t, name in _KINDS if issubclass(kind, t))


def _group(message: Message, allowed: tuple[str, ...], where: str) -> dict[str, list[Field]]:
    groups: dict[str, list[Field]] = {}
    for f in message.fields:
        if f.name not in allowed:
            raise ValueError(
                f"line {f.line}: unknown field in {where} (allowed: {', '.join(allowed)})"
            )
        groups.setdefault(f.name, []).append(f)
    return groups


def _one(groups: dict[str, list[Field]], key: str, kind: type, where: str, default=_MISSING):
    fields = groups.get(key, [])
    if len(fields) > 1:
        raise ValueError(f"line {fields[1].line}: {key!r} repeated in {where}")
    if not fields:
        if default is _MISSING:
            raise ValueError(f"{where} has no {key!r}")
        return default
    value = fields[0].value
    if not isinstance(value, kind) or (kind is str and isinstance(value, Enum)):
        raise ValueError(
            f"line {fields[0].line}: {key!r} must be {_kind(kind)}, found {_kind(type(value))}"
        )
    return value


def _many(groups: dict[str, list[Field]], key: str, kind: type) -> list:
    """A repeated field: ``key: [a, b]`` and/or ``key: a key: b``, flattened."""
    out = []
    for f in groups.get(key, []):
        for value in f.value if isinstance(f.value, list) else [f.value]:
            if not isinstance(value, kind) or (kind is not Enum and isinstance(value, Enum)):
                raise ValueError(
                    f"line {f.line}: each {key!r} value must be {_kind(kind)}, "
                    f"found {_kind(type(value))}"
                )
            out.append(value)
    return out


def _read_tensor(message: Message, where: str) -> dict[str, Any]:
    g = _group(message, _TENSOR, where)
    name = _one(g, "name", str, where)
    data_type = _one(g, "data_type", Enum, where)
    if data_type not in TRITON_TYPES.values():
        raise ValueError(
            f"line {g['data_type'][0].line}: unknown data_type "
            f"(allowed: {', '.join(TRITON_TYPES.values())})"
        )
    dims = _many(g, "dims", int)
    if not dims or any(d < -1 for d in dims):
        raise ValueError(f"line {message.line}: {where} needs dims, each >= -1")
    reshape = _one(g, "reshape", Message, where, None)
    if reshape is not None:
        reshape = _many(_group(reshape, ("shape",), "reshape"), "shape", int)
    return {"name": name, "data_type": str(data_type), "dims": dims, "reshape": reshape}


def parse_config(text: str) -> Config:
    """Parse ``config.pbtxt`` text (the subset :func:`format_config` writes).

    Raises:
        ValueError: syntax outside the subset, an unknown or repeated field, a missing or
            mistyped value; the message starts with ``line <n>:`` (and, for syntax,
            ``column <m>:``) and names the kind of what was found, never its text.
    """
    top = _group(parse(text), _TOP, "the config")
    config: Config = {
        "name": _one(top, "name", str, "the config"),
        "platform": _one(top, "platform", str, "the config"),
        "max_batch_size": _one(top, "max_batch_size", int, "the config", 0),
    }
    for field, key in (("input", "inputs"), ("output", "outputs")):
        config[key] = [_read_tensor(m, field) for m in _many(top, field, Message)]
    for field, key in (("input", "inputs"), ("output", "outputs")):
        if not config[key]:
            raise ValueError(f"the config has no {field!r}")
    batching = _one(top, "dynamic_batching", Message, "the config", None)
    if batching is not None:
        g = _group(batching, _BATCHING, "dynamic_batching")
        batching = {
            "preferred_batch_size": _many(g, "preferred_batch_size", int),
            "max_queue_delay_microseconds": _one(
                g, "max_queue_delay_microseconds", int, "dynamic_batching", 0
            ),
        }
    config["dynamic_batching"] = batching
    names = {t["name"] for t in config["inputs"]}
    config["parameters"] = _read_parameters(_many(top, "parameters", Message), names)
    return config


def _read_parameters(messages: list[Message], inputs: set[str]) -> dict[str, str]:
    """Triton's ``parameters`` map (``{ key: "k" value: { string_value: "v" } }`` each) as
    ``{k: v}``; a ``normport.*`` key must be one this module documents."""
    out: dict[str, str] = {}
    for message in messages:
        g = _group(message, ("key", "value"), "parameters")
        key = _one(g, "key", str, "parameters")
        value = _one(g, "value", Message, "parameters")
        where = "a parameters value"
        text = _one(_group(value, ("string_value",), where), "string_value", str, where)
        if key in out:
            raise ValueError(f"line {message.line}: parameters key repeated")
        if key.startswith("normport.") and not _known_key(key, inputs):
            raise ValueError(
                f"line {message.line}: unknown normport parameters key (allowed: "
                f"{MAX_SHAPE}<input>, {MIN_SHAPE}<input> for an input of the config, "
                f"{', '.join(NORMPORT_KEYS)})"
            )
        out[key] = text
    return out


def _known_key(key: str, inputs: set[str]) -> bool:
    if key in NORMPORT_KEYS:
        return True
    return any(key.startswith(p) and key[len(p) :] in inputs for p in (MAX_SHAPE, MIN_SHAPE))


def read_config(path: str | os.PathLike) -> Config:
    """Parse ``path`` (a ``config.pbtxt``, or a model folder holding one); see :func:`parse_config`.

    Raises:
        ValueError: as :func:`parse_config`, prefixed with the path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        return parse_config(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
