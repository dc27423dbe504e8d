"""How recalibration re-estimates running statistics: ``precise`` or ``ema``.

A normport training graph calls one function per stateful layer (domain ``normport``,
:mod:`export.lowerings`), and the function name says which update rule the layer exported with:

=====================================  ==========================================  ==============
call                                   update weight ``m_k`` at batch ``k``        counts batches
=====================================  ==========================================  ==============
``BatchNormTrain``                     ``momentum`` (call-site attribute)          yes
``BatchNormTrainCumulative``           ``1 / (num_batches_tracked + 1)``           yes
``SwitchableNormTrain[Cumulative]``    as BatchNorm (the batch branch)             yes
``InstanceNormTrain``                  ``momentum``                                no
``InstanceNormTrainFrozen``            0 (torch.nn's InstanceNorm, momentum=None)  no
=====================================  ==========================================  ==============

with ``r_k = (1 - m_k) r_{k-1} + m_k s_k``, ``s_k`` the batch's mean, or its *unbiased*
variance ``var_k n / (n - 1)`` (``n`` values per channel).

**ema** replays training's own rule over the ``K`` batches from ``r_0`` (exported, or reset to
mean 0 / variance 1).  With a constant momentum ``m``:

.. math::

    r_K = (1 - m)^K r_0 + \\sum_{k=1}^{K} m (1 - m)^{K - k} s_k

so the data carries ``1 - (1 - m)^K`` of the weight (47 % for m = 0.1, K = 6) and ``r_0`` the
rest: :func:`ema_reset_warning` says so when ``r_0`` is the reset values.

**precise** is the population estimate of Wu & Johnson, *Rethinking "Batch" in BatchNorm*
(2021), what ``torch.optim.swa_utils.update_bn`` computes (reset, ``momentum=None``, one pass):
every batch gets the same weight, whatever the exported momentum,

.. math::

    \\hat\\mu = \\frac{1}{K} \\sum_{k=1}^{K} \\mu_k, \\qquad
    \\hat\\sigma^2 = \\frac{1}{K} \\sum_{k=1}^{K} \\sigma^2_k \\frac{n_k}{n_k - 1}

and ``num_batches_tracked`` is reset to 0 and then counts the batches where the layer counts
(``K`` for BatchNorm and SwitchableNorm, 0 for InstanceNorm), as update_bn leaves it.  It is
run by :func:`per_batch_form`: every stateful call is rewritten to its momentum form with
``m = 1``, so each step's ``.next`` outputs are that batch's own ``s_k``, and the mean over
batches is taken here in float64.  One rewrite serves every layer (InstanceNorm has no
counting cumulative function to rewrite to) and nothing depends on the exported statistics:
``(1 - 1) r = 0`` for any finite ``r``, and the run starts from the reset values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from normport.export._emit import FUNCTION_DOMAIN, Emitter
from normport.export.lowerings.batchnorm import batch_stats_function
from normport.export.lowerings.switchable import _function as switchable_function

__all__ = [
    "METHODS",
    "StatefulLayer",
    "ema_reset_warning",
    "per_batch_form",
    "precise_statistics",
    "stateful_layers",
]

METHODS = ("precise", "ema")

_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
)

# call -> (its momentum form, whether the layer counts batches, its kind)
_CALLS = {
    "BatchNormTrain": ("BatchNormTrain", True, "batchnorm"),
    "BatchNormTrainCumulative": ("BatchNormTrain", True, "batchnorm"),
    "SwitchableNormTrain": ("SwitchableNormTrain", True, "switchable"),
    "SwitchableNormTrainCumulative": ("SwitchableNormTrain", True, "switchable"),
    "InstanceNormTrain": ("InstanceNormTrain", False, "instancenorm"),
    "InstanceNormTrainFrozen": ("InstanceNormTrain", False, "instancenorm"),
}


@dataclass(frozen=True)
class StatefulLayer:
    """One layer that updates running statistics in the training graph.

    ``momentum``: the exported update weight; None for the cumulative average, 0.0 for a
    frozen InstanceNorm (``momentum=None`` in torch.nn).
    """

    path: str
    call: str
    momentum: float | None
    counts: bool
    state: tuple[str, str, str]  # the running_mean, running_var, num_batches_tracked inputs


def stateful_layers(model: onnx.ModelProto) -> list[StatefulLayer]:
    """The stateful calls of a normport training graph, in graph order."""
    layers = []
    for node in model.graph.node:
        if node.domain != FUNCTION_DOMAIN or node.op_type not in _CALLS:
            continue
        mean = node.input[3]
        path = "" if mean == "running_mean" else mean.removesuffix(".running_mean")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type.endswith("Frozen"):
            momentum = 0.0
        elif node.op_type.endswith("Cumulative"):
            momentum = None
        else:
            momentum = float(attrs["momentum"])
        counts = _CALLS[node.op_type][1]
        state = (node.input[3], node.input[4], node.input[5])
        layers.append(StatefulLayer(path, node.op_type, momentum, counts, state))
    return layers


def ema_reset_warning(layers: Sequence[StatefulLayer], batches: int) -> str | None:
    """What ``ema`` from reset statistics leaves of the reset values, per distinct momentum."""
    parts = []
    for momentum in sorted({la.momentum for la in layers if la.momentum is not None}):
        data = 1.0 - (1.0 - momentum) ** batches
        if data >= 0.995:
            continue
        frozen = " (InstanceNorm with momentum=None never moves)" if momentum == 0 else ""
        parts.append(
            f"momentum {momentum:g}{frozen} over {batches} batch(es): the statistics carry "
            f"{data:.0%} of the data's mean and {1 - data:.0%} of the reset values"
        )
    if not parts:
        return None
    return "; ".join(parts) + "; use --method precise (method='precise')"


def _elem_type(model: onnx.ModelProto) -> int:
    """The activation type the export used: its first floating graph input's (export.api)."""
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if elem in _FLOAT_TYPES and not value.name.endswith(("running_mean", "running_var")):
            return elem
    return onnx.TensorProto.FLOAT


def _momentum_function(em: Emitter, name: str) -> onnx.FunctionProto:
    if name == "SwitchableNormTrain":
        return switchable_function(em, "attr", False)
    instance = name == "InstanceNormTrain"
    return batch_stats_function(em, name, momentum="attr", counts=not instance, instance=instance)


def per_batch_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose stateful calls use momentum 1: ``.next`` = the batch's own statistics.

    Each call becomes its momentum form (``BatchNormTrain``, ``InstanceNormTrain``,
    ``SwitchableNormTrain``) with ``momentum=1.0`` at the call site; a function the model
    does not define yet is emitted as :mod:`export.lowerings` would for that layer.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    em = Emitter(opset, _elem_type(out), taken=set())
    defined = {f.name for f in out.functions}
    for node in out.graph.node:
        if node.domain != FUNCTION_DOMAIN or node.op_type not in _CALLS:
            continue
        target = _CALLS[node.op_type][0]
        if target not in defined:
            out.functions.append(_momentum_function(em, target))
            defined.add(target)
        node.op_type = target
        kept = [a for a in node.attribute if a.name != "momentum"]
        node.ClearField("attribute")
        node.attribute.extend([*kept, helper.make_attribute("momentum", 1.0)])
    return out


def precise_statistics(
    layers: Sequence[StatefulLayer],
    sums: dict[str, np.ndarray],
    last: dict[str, np.ndarray],
    batches: int,
) -> dict[str, np.ndarray]:
    """Equal-weight means from float64 ``sums`` of per-batch statistics; counts from ``last``."""
    state = {}
    for layer in layers:
        mean, var, count = layer.state
        for name in (mean, var):
            state[name] = (sums[name] / batches).astype(last[name].dtype)
        state[count] = last[count]
    return state
