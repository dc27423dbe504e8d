"""``config.pbtxt``: Triton's own ``ModelConfig`` schema, read and written with protobuf.

The schema is Triton Inference Server's ``model_config.proto`` (message
``inference.ModelConfig``): ``model_config.binpb`` beside this module is its compiled
``FileDescriptorProto`` (``protoc --descriptor_set_out``; the descriptor tritonclient 2.73.0
ships in ``tritonclient/grpc/model_config_pb2.py``, BSD-3-Clause, NVIDIA), loaded into
protobuf's default pool at import.  Text goes through
protobuf's ``text_format`` in both directions and the served JSON through ``json_format``, so
what normport writes is what Triton reads, field for field:

>>> config = parse('name: "m" platform: "onnxruntime_onnx" max_batch_size: 8 '
...                'input { name: "x" data_type: TYPE_FP32 dims: [ 3 ] }')
>>> config.input[0].dims, type_name(config.input[0].data_type)
([3], 'TYPE_FP32')
>>> to_text(config, comment="why")   # '# ...\\n# why\\nname: "m"\\n...'
>>> to_json(config)["input"][0]["dims"]   # Triton's JSON: int64 fields as numbers
[3]

The repository layout (:data:`CONFIG_NAME`, :data:`MODEL_NAME`, :data:`VERSION`,
:data:`PLATFORM`) and normport's own ``parameters`` keys are defined here once, for the writer
(:mod:`export.repository`) and the server (:mod:`runtime.serve`).  This module imports protobuf
only: the server reads configs without torch.

normport's ``parameters`` keys (Triton keeps and ignores them):

- ``normport.max_shape.<input>`` / ``normport.min_shape.<input>``: per-sample inclusive bounds of
  an input's dims, a JSON list of ints with one entry per ``dims`` entry, ``-1`` where an axis
  has no bound (written by export from the graph, enforced by the server with a 400);
- ``normport.memory_budget``: the model's memory budget (a size such as ``"2GiB"``).

Any other ``normport.*`` key is refused (:func:`check_parameters`); every other key is kept.

Parse errors say where (``line 3, column 7:``) and what kind of problem it is, naming only the
schema's field and enum names, never the file's text: a config may be any file an operator
points at, and its content must not reach a client through an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from google.protobuf import descriptor_pool, json_format, message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

__all__ = [
    "CONFIG_NAME",
    "MAX_SHAPE",
    "MEMORY_BUDGET",
    "MIN_SHAPE",
    "MODEL_NAME",
    "NORMPORT_KEYS",
    "PLATFORM",
    "VERSION",
    "DataType",
    "ModelConfig",
    "ModelInput",
    "ModelOutput",
    "check_parameters",
    "parameters",
    "parse",
    "read",
    "to_json",
    "to_text",
    "type_name",
    "type_value",
]

PLATFORM = "onnxruntime_onnx"
CONFIG_NAME = "config.pbtxt"
MODEL_NAME = "model.onnx"
VERSION = "1"
MAX_SHAPE = "normport.max_shape."  # + an input's name: parameter key of its per-sample maxima
MIN_SHAPE = "normport.min_shape."  # + an input's name: ... of its minima
MEMORY_BUDGET = "normport.memory_budget"
NORMPORT_KEYS = (MEMORY_BUDGET,)  # the model-wide normport keys

_SCHEMA = Path(__file__).with_name("model_config.binpb")
# The same bytes as tritonclient's: loading both into the default pool is allowed.
_FILE = descriptor_pool.Default().AddSerializedFile(_SCHEMA.read_bytes())
if TYPE_CHECKING:  # classes made at run time from the descriptor: no static fields to check
    ModelConfig: TypeAlias = Any
    ModelInput: TypeAlias = Any
    ModelOutput: TypeAlias = Any
else:
    ModelConfig = message_factory.GetMessageClass(_FILE.message_types_by_name["ModelConfig"])
    ModelInput = message_factory.GetMessageClass(_FILE.message_types_by_name["ModelInput"])
    ModelOutput = message_factory.GetMessageClass(_FILE.message_types_by_name["ModelOutput"])
DataType = EnumTypeWrapper(_FILE.enum_types_by_name["DataType"])  # DataType.Name(11): TYPE_FP32

HEADER = "# Triton Inference Server model configuration (inference.ModelConfig), by normport."


def type_name(data_type: int) -> str:
    """``TYPE_FP32`` for ``DataType.TYPE_FP32`` (an int from a message field)."""
    return DataType.Name(data_type)


def type_value(name: str) -> int:
    """The ``DataType`` number of ``TYPE_*`` ``name``; ValueError naming the allowed names."""
    if name not in DataType.keys():  # noqa: SIM118 (an EnumTypeWrapper, not a dict)
        raise ValueError(f"unknown data_type {name!r} (allowed: {', '.join(DataType.keys())})")
    return DataType.Value(name)


def parse(text: str) -> ModelConfig:
    """Parse ``config.pbtxt`` text (any text format protobuf accepts for ``ModelConfig``).

    Raises:
        ValueError: not ``ModelConfig`` text format, or an unknown ``normport.*`` parameters
            key; a syntax message starts with ``line <n>, column <m>:`` and never quotes text.
    """
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(_describe(e)) from None
    check_parameters(config)
    return config


def read(path: str | os.PathLike) -> ModelConfig:
    """Parse ``path`` (a ``config.pbtxt``, or a model folder holding one); see :func:`parse`.

    Raises:
        ValueError: as :func:`parse`, prefixed with the path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        return parse(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def to_text(config: ModelConfig, comment: str | None = None) -> str:
    """``config`` in protobuf text format, after a ``#`` header and ``comment``'s lines (as
    ``#`` lines, which every reader skips)."""
    lines = [HEADER, *(f"# {line}".rstrip() for line in (comment or "").splitlines())]
    return "\n".join(lines) + "\n" + text_format.MessageToString(config)


def to_json(config: ModelConfig) -> dict[str, Any]:
    """Triton's JSON form of ``config`` (``GET /v2/models/{m}/config``): protobuf's JSON with
    field names as in the ``.proto``, every field without presence printed, and int64 fields as
    JSON numbers (protobuf writes them as strings; Triton turns them back into numbers)."""
    out = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(out, config.DESCRIPTOR)
    return out


def parameters(config: ModelConfig) -> dict[str, str]:
    """The ``parameters`` map as ``{key: string_value}``."""
    return {key: value.string_value for key, value in config.parameters.items()}


def check_parameters(config: ModelConfig) -> None:
    """Refuse a ``normport.*`` parameters key this module does not define (a shape key must
    name an input of the config).

    Raises:
        ValueError: naming the allowed keys, never the key found.
    """
    inputs = {t.name for t in config.input}
    for key in config.parameters:
        if key.startswith("normport.") and not _known_key(key, inputs):
            raise ValueError(
                f"unknown normport parameters key (allowed: {MAX_SHAPE}<input>, "
                f"{MIN_SHAPE}<input> for an input of the config, {', '.join(NORMPORT_KEYS)})"
            )


def _known_key(key: str, inputs: set[str]) -> bool:
    if key in NORMPORT_KEYS:
        return True
    return any(key.startswith(p) and key[len(p) :] in inputs for p in (MAX_SHAPE, MIN_SHAPE))


_INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64)


def _int64_as_numbers(value: dict[str, Any], descriptor: Descriptor) -> None:
    """Turn ``json_format``'s int64 strings back into ints, in place, by the schema."""
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, entry in item.items():
                if value_field.message_type is not None:
                    _int64_as_numbers(entry, value_field.message_type)
                elif value_field.type in _INT64:
                    item[key] = int(entry)
        elif field.message_type is not None:
            for entry in item if isinstance(item, list) else [item]:
                _int64_as_numbers(entry, field.message_type)
        elif field.type in _INT64:
            value[field.name] = [int(v) for v in item] if isinstance(item, list) else int(item)


# protobuf's ParseError text quotes the input; only these fixed phrases (and the schema names
# they carry, checked against the schema) are passed on.
_FIELD = re.compile(r'Message type "([\w.]+)" has no field named')
_REPEATED = re.compile(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields')
_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named')
_PHRASES = {
    "Couldn't parse integer": "expected an integer",
    "Couldn't parse float": "expected a number",
    "Value out of range": "integer out of range for its field",
    "Expected string": "expected a quoted string",
    "Expected identifier": "expected a field name or identifier",
    "String missing ending quote": "a quoted string has no closing quote",
    "Invalid escape": "unsupported escape sequence in a quoted string",
    'Expected "{"': "expected '{'",
    'Expected "}"': "expected '}'",
    'Expected ":"': "expected ':' after a field name",
    'Expected ","': "expected ',' or ']' in a list",
    'Expected "]"': "expected ']'",
    "Expected integer": "expected an integer",
}


def _describe(error: text_format.ParseError) -> str:
    where = f"line {error.GetLine()}, column {error.GetColumn()}"
    return f"{where}: {_problem(str(error))}"


def _problem(message: str) -> str:
    pool = descriptor_pool.Default()
    if match := _FIELD.search(message):
        message_type = _schema_message(pool, match.group(1))
        if message_type is not None:
            allowed = ", ".join(f.name for f in message_type.fields)
            return f"unknown field in {message_type.name} (allowed: {allowed})"
    if match := _REPEATED.search(message):
        message_type = _schema_message(pool, match.group(1))
        if message_type is not None and match.group(2) in message_type.fields_by_name:
            return f"field {match.group(2)!r} repeated in {message_type.name}"
    if match := _ENUM.search(message):
        try:
            enum = pool.FindEnumTypeByName(match.group(1))
        except KeyError:
            enum = None
        if enum is not None and enum.full_name.startswith("inference."):
            allowed = ", ".join(v.name for v in enum.values)
            return f"unknown value for {enum.name} (allowed: {allowed})"
    for phrase, problem in _PHRASES.items():
        if phrase in message:
            return problem
    return "not valid text format for Triton's ModelConfig"


def _schema_message(pool, name: str) -> Descriptor | None:
    """The ``inference.*`` message type ``name``, or None when it is not the schema's."""
    if not name.startswith("inference."):
        return None
    try:
        return pool.FindMessageTypeByName(name)
    except KeyError:
        return None
