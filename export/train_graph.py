"""The training-graph contract: what ``export.to_onnx(..., mode="train")`` produces, for the
code that runs, recalibrates, verifies or refuses to serve such a graph.

Each layer that updates running statistics, at module path ``<path>``, reads them from graph
inputs that default to the exported values and returns the updated values as outputs:

==========================================  ===========================================
graph input (default: exported value)       graph output (after this step)
==========================================  ===========================================
``<path>.running_mean``                     ``<path>.running_mean.next``
``<path>.running_var``                      ``<path>.running_var.next``
``<path>.num_batches_tracked`` (int64 [])   ``<path>.num_batches_tracked.next``
==========================================  ===========================================

and is one call of a :class:`TrainFunction` (domain ``normport``) whose inputs 3-5 are those
state inputs.  The model's ``metadata_props`` say ``mode=train`` (:data:`MODE_KEY`).

:func:`to_eval` turns such a graph into the inference graph with given statistics, and
:func:`per_batch_form` into one whose ``.next`` outputs are each batch's own statistics; both
are rewrites of the calls (:mod:`export._train_rewrite`).  This module imports onnx only: the
server reads the contract without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import onnx

from normport.export._emit import FUNCTION_DOMAIN

__all__ = [
    "MODE_KEY",
    "NEXT_SUFFIX",
    "STATE_NAMES",
    "StatefulLayer",
    "TrainFunction",
    "layer_path",
    "mode",
    "per_batch_form",
    "state_names",
    "state_pairs",
    "stateful_layers",
    "to_eval",
]

STATE_NAMES = ("running_mean", "running_var", "num_batches_tracked")
NEXT_SUFFIX = ".next"
MODE_KEY = "mode"  # metadata_props key: "train" or "eval"
_REQUIRED_METADATA = ("normport_version", "opset", MODE_KEY)


class TrainFunction(StrEnum):
    """The training calls that update running statistics (function names, domain
    ``normport``), and what each one's update weight ``m_k`` is:

    - ``*Train``: the ``momentum`` attribute at the call site;
    - ``*TrainCumulative``: ``1 / (num_batches_tracked + 1)`` (torch.nn's ``momentum=None``);
    - ``InstanceNormTrainFrozen``: 0 (torch.nn's InstanceNorm with ``momentum=None``).
    """

    BATCHNORM = "BatchNormTrain"
    BATCHNORM_CUMULATIVE = "BatchNormTrainCumulative"
    INSTANCENORM = "InstanceNormTrain"
    INSTANCENORM_FROZEN = "InstanceNormTrainFrozen"
    SWITCHABLE = "SwitchableNormTrain"
    SWITCHABLE_CUMULATIVE = "SwitchableNormTrainCumulative"

    @property
    def momentum_form(self) -> TrainFunction:
        """The call with the momentum attribute that computes the same layer."""
        return TrainFunction(self.value.removesuffix("Cumulative").removesuffix("Frozen"))

    @property
    def counts_batches(self) -> bool:
        """Whether the call increments ``num_batches_tracked`` (InstanceNorm does not)."""
        return not self.value.startswith("InstanceNorm")

    @property
    def kind(self) -> str:
        """The layer table's lowering kind (:mod:`models.table`)."""
        return {"Batch": "batchnorm", "Insta": "instancenorm", "Switc": "switchable"}[
            self.value[:5]
        ]


def state_names(path: str) -> list[tuple[str, str]]:
    """``(input, output)`` names of the running statistics of the layer at ``path``."""
    prefix = f"{path}." if path else ""
    return [(f"{prefix}{s}", f"{prefix}{s}{NEXT_SUFFIX}") for s in STATE_NAMES]


def state_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(input, output)`` names of the running statistics ``model`` carries, in input order:
    a graph input ``<path>.<stat>`` (a :data:`STATE_NAMES` entry) whose ``.next`` is an output."""
    outputs = {o.name for o in model.graph.output}
    return [
        (i.name, i.name + NEXT_SUFFIX)
        for i in model.graph.input
        if i.name + NEXT_SUFFIX in outputs and i.name.rsplit(".", 1)[-1] in STATE_NAMES
    ]


def mode(model: onnx.ModelProto) -> str | None:
    """The ``mode`` metadata (``"train"`` / ``"eval"``), None when absent."""
    return next((p.value for p in model.metadata_props if p.key == MODE_KEY), None)


def layer_path(node: onnx.NodeProto) -> str:
    """The module path of a :class:`TrainFunction` call, from its ``<path>.running_mean``
    input (input 3).

    Raises:
        ValueError: input 3 is not a running mean (the message names the node).
    """
    name = node.input[3] if len(node.input) > 3 else ""
    if name == STATE_NAMES[0]:
        return ""
    if not name.endswith("." + STATE_NAMES[0]):
        raise ValueError(
            f"node {node.name!r} ({node.op_type}): input 3 should be '<path>.running_mean', "
            f"got {name!r}; is this a normport training export?"
        )
    return name.removesuffix("." + STATE_NAMES[0])


@dataclass(frozen=True)
class StatefulLayer:
    """One :class:`TrainFunction` call of a training graph.

    ``momentum``: the exported update weight; None for the cumulative average, 0.0 for a
    frozen InstanceNorm (``momentum=None`` in torch.nn).
    """

    path: str
    call: TrainFunction
    momentum: float | None
    state: tuple[str, str, str]  # the running_mean, running_var, num_batches_tracked inputs

    @property
    def counts(self) -> bool:
        return self.call.counts_batches


def stateful_layers(model: onnx.ModelProto) -> list[StatefulLayer]:
    """The :class:`TrainFunction` calls of ``model``, in graph order."""
    calls = {f.value for f in TrainFunction}
    layers = []
    for node in model.graph.node:
        if node.domain != FUNCTION_DOMAIN or node.op_type not in calls:
            continue
        call = TrainFunction(node.op_type)
        layers.append(StatefulLayer(layer_path(node), call, _momentum(node, call), _state(node)))
    return layers


def _momentum(node: onnx.NodeProto, call: TrainFunction) -> float | None:
    if call is TrainFunction.INSTANCENORM_FROZEN:
        return 0.0
    if call.value.endswith("Cumulative"):
        return None
    attr = next(a for a in node.attribute if a.name == "momentum")
    return float(onnx.helper.get_attribute_value(attr))


def _state(node: onnx.NodeProto) -> tuple[str, str, str]:
    return node.input[3], node.input[4], node.input[5]


def to_eval(
    train_model: onnx.ModelProto,
    statistics: Mapping[str, np.ndarray],
    *,
    batches: int,
    method: str | None = None,
) -> onnx.ModelProto:
    """The inference graph of ``train_model`` with ``statistics`` as its running statistics:
    every :class:`TrainFunction` call becomes what ``export.to_onnx`` emits for that layer in
    eval mode, training-mode ``Dropout`` becomes ``Identity``, the state inputs and outputs go.

    Args:
        train_model: a normport training export (not inlined: the calls are found by name).
        statistics: a value for every state input (``<path>.running_mean``, ...).
        batches: how many batches produced them (recorded in the metadata).
        method: how they were estimated (``precise`` / ``ema``; recorded if given).

    Raises:
        ValueError: not a normport training graph, missing statistics, or a node with no
            inference form (named).
    """
    metadata = _eval_metadata(train_model, batches, method)
    from normport.export._train_rewrite import rewrite_to_eval

    return rewrite_to_eval(train_model, statistics, metadata)


def _eval_metadata(model: onnx.ModelProto, batches: int, method: str | None) -> dict[str, str]:
    """The training export's metadata for its inference graph: ``mode=eval``, the PyTorch
    weights hash kept as ``recalibrated_from_weights_sha256`` (the statistics are no longer
    that state), and how the statistics were estimated."""
    metadata = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing or metadata[MODE_KEY] != "train":
        raise ValueError(
            f"not a normport training export: expected metadata {MODE_KEY}='train' (got "
            f"{metadata.get(MODE_KEY)!r}); missing keys {missing}"
        )
    metadata[MODE_KEY] = "eval"
    if "weights_sha256" in metadata:
        metadata["recalibrated_from_weights_sha256"] = metadata.pop("weights_sha256")
    metadata["recalibration_batches"] = str(batches)
    if method is not None:
        metadata["recalibration_method"] = method
    return metadata


def per_batch_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose :class:`TrainFunction` calls use their momentum form with momentum 1, so
    that each step's ``.next`` outputs are that batch's own statistics (``(1 - 1) r = 0``
    whatever the running value ``r``; the running variance is the unbiased one)."""
    from normport.export._train_rewrite import per_batch_form as rewrite

    return rewrite(model)
