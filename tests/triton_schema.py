"""The tests' oracle for ``config.pbtxt``: Triton's ``ModelConfig`` schema as tritonclient ships
it (``tritonclient/grpc/model_config_pb2.py``, loaded from its file: the ``tritonclient.grpc``
package needs grpc), parsed by protobuf's ``text_format``, never by normport's code.

:func:`read_config` gives a plain dict, so that a test states what a config must say::

    {"name", "platform", "max_batch_size",
     "inputs" / "outputs": [{"name", "data_type", "dims", "reshape"}],   # reshape: None or list
     "dynamic_batching": None or {"preferred_batch_size", "max_queue_delay_microseconds"},
     "parameters": {key: string_value}}
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from google.protobuf import text_format

__all__ = ["as_dict", "parse_config", "read_config", "schema"]


@cache
def schema() -> ModuleType:
    """tritonclient's compiled ``model_config_pb2`` module."""
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None and spec.submodule_search_locations, "tritonclient is not installed"
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    loaded = importlib.util.spec_from_file_location("tritonclient_model_config_pb2", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def parse_config(text: str) -> dict[str, Any]:
    """``text`` parsed against Triton's schema (``text_format.ParseError`` when it is not
    valid ModelConfig text), as :func:`as_dict`."""
    return as_dict(text_format.Parse(text, schema().ModelConfig()))


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``path`` (a ``config.pbtxt`` or its model folder), as :func:`parse_config`."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.pbtxt"
    return parse_config(path.read_text(encoding="utf-8"))


def as_dict(config) -> dict[str, Any]:
    """The fields normport writes, of any ``ModelConfig`` message (normport's or Triton's)."""
    tensor_type = config.DESCRIPTOR.fields_by_name["input"].message_type
    data_type = tensor_type.fields_by_name["data_type"].enum_type

    def tensor(t) -> dict[str, Any]:
        return {
            "name": t.name,
            "data_type": data_type.values_by_number[t.data_type].name,
            "dims": list(t.dims),
            "reshape": list(t.reshape.shape) if t.HasField("reshape") else None,
        }

    batching = None
    if config.HasField("dynamic_batching"):
        batching = {
            "preferred_batch_size": list(config.dynamic_batching.preferred_batch_size),
            "max_queue_delay_microseconds": config.dynamic_batching.max_queue_delay_microseconds,
        }
    return {
        "name": config.name,
        "platform": config.platform,
        "max_batch_size": config.max_batch_size,
        "inputs": [tensor(t) for t in config.input],
        "outputs": [tensor(t) for t in config.output],
        "dynamic_batching": batching,
        "parameters": {k: v.string_value for k, v in config.parameters.items()},
    }
