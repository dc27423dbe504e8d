"""What a served model looks like from outside: tensors, shapes, batching; metadata and config JSON.

Built from the dict :func:`export.repository.read_config` returns (the ``config.pbtxt`` that
``make export`` writes), never from a request.  Shapes follow Triton: with
``max_batch_size > 0`` every tensor's client shape is ``[batch] + dims``; with 0 it is ``dims``.
A ``reshape`` (``dims: [ 1 ] reshape: { shape: [ ] }`` for a per-sample scalar) is the shape the
graph itself sees per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.serve import datatypes
from runtime.serve.datatypes import DataType

__all__ = ["Batching", "ModelSpec", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, datatype, per-sample ``dims`` (-1 = any), graph ``reshape``."""

    name: str
    datatype: DataType
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, tensor: dict[str, Any]) -> TensorSpec:
        reshape = tensor.get("reshape")
        return cls(
            name=tensor["name"],
            datatype=datatypes.from_triton_type(tensor["data_type"]),
            dims=tuple(tensor["dims"]),
            reshape=None if reshape is None else tuple(reshape),
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
    config: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any], version: str) -> ModelSpec:
        """Raises ValueError for a datatype the service does not support."""
        dynamic = config.get("dynamic_batching")
        batching = None
        if dynamic is not None and config["max_batch_size"] > 0:
            batching = Batching(
                preferred_batch_sizes=tuple(sorted(dynamic["preferred_batch_size"])),
                max_queue_delay_s=dynamic["max_queue_delay_microseconds"] / 1e6,
            )
        return cls(
            name=config["name"],
            version=version,
            platform=config["platform"],
            max_batch_size=config["max_batch_size"],
            inputs=tuple(TensorSpec.from_config(t) for t in config["inputs"]),
            outputs=tuple(TensorSpec.from_config(t) for t in config["outputs"]),
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
        """The JSON form of ``config.pbtxt`` (Triton's ModelConfig), with what is implied spelled
        out: backend, the version policy (every version folder is served), one instance."""
        tensors = {}
        for key, field in (("inputs", "input"), ("outputs", "output")):
            tensors[field] = [
                {"name": t["name"], "data_type": t["data_type"], "dims": list(t["dims"])}
                | ({} if t.get("reshape") is None else {"reshape": {"shape": list(t["reshape"])}})
                for t in self.config[key]
            ]
        out: dict[str, Any] = {
            "name": self.name,
            "platform": self.platform,
            "backend": "onnxruntime",
            "version_policy": {"all": {}},
            "max_batch_size": self.max_batch_size,
            **tensors,
            "instance_group": [{"name": self.name, "kind": instance_kind, "count": 1}],
            "default_model_filename": "model.onnx",
        }
        dynamic = self.config.get("dynamic_batching")
        if dynamic is not None:
            out["dynamic_batching"] = {
                "preferred_batch_size": list(dynamic["preferred_batch_size"]),
                "max_queue_delay_microseconds": dynamic["max_queue_delay_microseconds"],
            }
        return out
