"""What a served model looks like from outside: tensors, shapes, batching; metadata and config JSON.

Built from the Triton ``ModelConfig`` that :func:`export.triton_config.parse` reads (the
``config.pbtxt`` that ``make export`` writes), never from a request.  Shapes follow Triton: with
``max_batch_size > 0`` every tensor's client shape is ``[batch] + dims``; with 0 it is ``dims``.
A ``reshape`` (``dims: [ 1 ] reshape: { shape: [ ] }`` for a per-sample scalar) is the shape the
graph itself sees per sample.

:meth:`ModelSpec.from_config` refuses what Triton refuses: ``max_batch_size < 0``,
``dynamic_batching`` without batching, a preferred batch size outside ``[1, max_batch_size]``,
a dim that is neither ``-1`` nor positive, a ``reshape`` whose element count differs from
``dims`` (compared run by run between ``-1`` entries, as Triton does), and a queue delay above
:data:`MAX_QUEUE_DELAY_US`.  Whether the config agrees with the graph is
:class:`runtime.serve.session.Session`'s check.

Shape bounds: the ``normport.min_shape.<input>`` / ``normport.max_shape.<input>`` parameters
(format: :mod:`export.triton_config`) become :attr:`TensorSpec.min_dims` / ``max_dims``, which
:mod:`runtime.serve.codec` enforces; :func:`shape_bounds` refuses a value that is not a JSON
list of ints ``-1`` or in ``[0, 2**63 - 1]``, one per ``dims`` entry, or that contradicts a
fixed dim or the other bound (a ValueError naming the parameter: the model is UNAVAILABLE).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from normport.export import triton_config
from normport.export.triton_config import (
    MAX_SHAPE,
    MIN_SHAPE,
    MODEL_NAME,
    ModelConfig,
)
from normport.runtime.serve import datatypes
from normport.runtime.serve.datatypes import DataType

__all__ = ["MAX_QUEUE_DELAY_US", "Batching", "ModelSpec", "TensorSpec", "shape_bounds"]

# A request waits at most this long for a batch to fill; Triton has no bound, but a delay of
# hours makes a lone request look hung, so a longer one is a config error here.
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s
_MAX_BATCH_SIZE = 2**31 - 1  # Triton's max_batch_size is an int32
_INT64_MAX = 2**63 - 1  # the largest ONNX dim


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, datatype, per-sample ``dims`` (-1 = any), graph ``reshape``,
    and per-sample inclusive size bounds like ``dims`` (-1 = none; None: no bound at all)."""

    name: str
    datatype: DataType
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    min_dims: tuple[int, ...] | None = None
    max_dims: tuple[int, ...] | None = None

    @classmethod
    def from_config(
        cls, tensor: triton_config.ModelInput | triton_config.ModelOutput
    ) -> TensorSpec:
        return cls(
            name=tensor.name,
            datatype=datatypes.from_triton_type(triton_config.type_name(tensor.data_type)),
            dims=tuple(tensor.dims),
            reshape=tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None,
        )

    def metadata(self, batched: bool) -> dict[str, Any]:
        shape = [-1, *self.dims] if batched else list(self.dims)
        return {"name": self.name, "datatype": self.datatype.name, "shape": shape}


@dataclass(frozen=True)
class Batching:
    """``dynamic_batching`` of the config: dispatch at a preferred size or after the delay."""

    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_s: float


@dataclass(frozen=True)
class ModelSpec:
    """A model version as the protocol shows it."""

    name: str
    version: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: Batching | None
    config: ModelConfig

    @classmethod
    def from_config(cls, config: ModelConfig, version: str) -> ModelSpec:
        """Raises ValueError for a datatype the service does not support, or a config Triton
        refuses (see :func:`_validate`)."""
        _validate(config)
        batching = None
        if config.HasField("dynamic_batching") and config.max_batch_size > 0:
            dynamic = config.dynamic_batching
            batching = Batching(
                preferred_batch_sizes=tuple(sorted(dynamic.preferred_batch_size)),
                max_queue_delay_s=dynamic.max_queue_delay_microseconds / 1e6,
            )
        parameters = triton_config.parameters(config)
        return cls(
            name=config.name,
            version=version,
            platform=config.platform,
            max_batch_size=config.max_batch_size,
            inputs=tuple(shape_bounds(TensorSpec.from_config(t), parameters) for t in config.input),
            outputs=tuple(TensorSpec.from_config(t) for t in config.output),
            batching=batching,
            config=config,
        )

    @property
    def batched(self) -> bool:
        """Requests carry a leading batch dimension (``max_batch_size > 0``)."""
        return self.max_batch_size > 0

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """The model metadata response (``GET /v2/models/{m}``)."""
        return {
            "name": self.name,
            "versions": versions,
            "platform": self.platform,
            "inputs": [t.metadata(self.batched) for t in self.inputs],
            "outputs": [t.metadata(self.batched) for t in self.outputs],
        }

    def config_json(self, instance_kind: str) -> dict[str, Any]:
        """Triton's JSON form of ``config.pbtxt`` (``ModelConfig``), with what is implied
        spelled out: backend, the version policy (every version folder is served), one instance
        of ``instance_kind`` (``KIND_CPU`` / ``KIND_GPU``), the model file name."""
        full = ModelConfig()
        full.CopyFrom(self.config)
        full.backend = "onnxruntime"
        full.version_policy.all.SetInParent()
        group = full.instance_group.add(name=self.name, count=1)
        group.kind = type(group).Kind.Value(instance_kind)
        full.default_model_filename = MODEL_NAME
        return triton_config.to_json(full)


def _validate(config: ModelConfig) -> None:
    """Refuse what Triton refuses: batching options and tensor shapes; the message names the
    field and its value.

    Raises:
        ValueError: the first problem found.
    """
    max_batch = config.max_batch_size
    if not 0 <= max_batch <= _MAX_BATCH_SIZE:
        raise ValueError(f"max_batch_size must be in [0, {_MAX_BATCH_SIZE}], got {max_batch}")
    if config.HasField("dynamic_batching"):
        dynamic = config.dynamic_batching
        if max_batch == 0:
            raise ValueError("dynamic_batching needs max_batch_size > 0, got max_batch_size 0")
        delay = dynamic.max_queue_delay_microseconds
        if not 0 <= delay <= MAX_QUEUE_DELAY_US:
            raise ValueError(
                f"max_queue_delay_microseconds must be in [0, {MAX_QUEUE_DELAY_US}], got {delay}"
            )
        for size in dynamic.preferred_batch_size:
            if not 0 < size <= max_batch:
                raise ValueError(
                    f"preferred_batch_size must be in [1, max_batch_size {max_batch}], got {size}"
                )
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            raise ValueError(f"the config has no {kind!r}")
        names: set[str] = set()
        for t in tensors:
            if not t.name:
                raise ValueError(f"an {kind} of the config has no name")
            where = f"{kind} {t.name!r}"
            if t.name in names:
                raise ValueError(f"{where} is listed twice")
            names.add(t.name)
            if t.data_type == triton_config.DataType.Value("TYPE_INVALID"):
                raise ValueError(f"{where} has no data_type")
            reshape = list(t.reshape.shape) if t.HasField("reshape") else None
            _validate_shape(where, list(t.dims), reshape)


def _validate_shape(where: str, dims: list[int], reshape: list[int] | None) -> None:
    """Triton's rule: every dim is -1 or positive; ``reshape`` holds as many elements as ``dims``,
    each run of fixed dims between two -1 on one side matching its run on the other."""
    if not dims:
        raise ValueError(f"{where}: dims must not be empty (a scalar is dims: [ 1 ] with reshape)")
    for field, shape in (("dims", dims), ("reshape", reshape or [])):
        bad = next((d for d in shape if d < 1 and d != -1), None)
        if bad is not None:
            raise ValueError(f"{where}: {field} must be -1 or positive, got {bad}")
    if reshape is None:
        return
    if _runs(dims) != _runs(reshape):
        raise ValueError(
            f"{where}: dims {list(dims)} and reshape {list(reshape)} differ in element count"
        )
    if dims.count(-1) > 1:  # numpy reshapes with one unknown dimension only
        raise ValueError(f"{where}: a reshape with more than one -1 is not supported")


def _runs(shape: list[int]) -> list[int]:
    """The element count of each run of fixed dims between -1 entries: ``[2, -1, 3, 4]`` gives
    ``[2, 12]``, a static shape one count."""
    runs = [1]
    for d in shape:
        if d == -1:
            runs.append(1)
        else:
            runs[-1] *= d
    return runs


def shape_bounds(tensor: TensorSpec, parameters: Mapping[str, str]) -> TensorSpec:
    """``tensor`` with ``min_dims`` / ``max_dims`` from its ``normport.{min,max}_shape.<name>``
    parameters (absent: None).

    Raises:
        ValueError: a bad value; the message names the parameter (never quotes the value).
    """
    found: dict[str, Any] = {}
    for prefix, field in ((MIN_SHAPE, "min_dims"), (MAX_SHAPE, "max_dims")):
        key = prefix + tensor.name
        if key in parameters:
            found[field] = _bound_row(key, parameters[key], tensor.dims)
    low, high = found.get("min_dims"), found.get("max_dims")
    if low is not None and high is not None:
        for i, (lo, hi) in enumerate(zip(low, high, strict=True)):
            if -1 not in (lo, hi) and lo > hi:
                raise ValueError(
                    f"parameters {MIN_SHAPE}{tensor.name} and {MAX_SHAPE}{tensor.name}: "
                    f"entry {i} has minimum {lo} above maximum {hi}"
                )
    return replace(tensor, **found) if found else tensor


def _bound_row(key: str, text: str, dims: tuple[int, ...]) -> tuple[int, ...]:
    """One parameter value: a JSON list, an int per ``dims`` entry, agreeing with fixed dims."""
    expected = f"a JSON list of {len(dims)} int(s), each -1 or in [0, {_INT64_MAX}]"
    try:
        row = json.loads(text)
    except ValueError:  # JSONDecodeError, and int()'s digit limit on a huge number
        raise ValueError(f"parameter {key}: not JSON; expected {expected}") from None
    if (
        not isinstance(row, list)
        or len(row) != len(dims)
        or not all(type(b) is int and (b == -1 or 0 <= b <= _INT64_MAX) for b in row)
    ):
        raise ValueError(f"parameter {key}: expected {expected} (one per dims entry)")
    for i, (bound, dim) in enumerate(zip(row, dims, strict=True)):
        if -1 not in (bound, dim) and bound != dim:
            raise ValueError(
                f"parameter {key}: entry {i} is {bound}, but that dim is fixed at {dim}"
            )
    return tuple(row)
