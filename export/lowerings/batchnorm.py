"""BatchNorm1d/2d/3d and SequenceBatchNorm.

- eval (running statistics): ``BatchNormalization`` (every opset 13-28).  SequenceBatchNorm's
  channel-last ``(N, L, C)`` input gets the folded per-channel form ``X * s + t`` instead of
  ``Transpose -> BatchNormalization -> Transpose``.  Both are the form table's choices
  (:mod:`export.lowerings._choices`, with the measurements: the folded form is slower than
  one BatchNormalization on ``(N, C, *)``, faster than the transposes on ``(N, L, C)``).
- batch statistics (training, or ``track_running_stats=False``): the function
  ``normport.BatchNormTrain`` (updating running statistics) or ``normport.BatchNormBatchStats``;
  with eps outside the root (hand-written, ``eps_in_root=False``): ``normport.NormalizeStdPlusEps``.
"""

from __future__ import annotations

import numpy as np
import onnx

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import (
    Layout,
    _stats,
    affine_inputs,
    batch_normalization,
    call,
    node_name,
    op,
    register,
)
from normport.export.lowerings._body import Body, define
from normport.export.lowerings._choices import Form, choose
from normport.export.lowerings.eps_outside import lower_eps_outside
from normport.export.train_graph import TrainFunction

__all__ = ["batch_stats_function", "lower_batchnorm"]


def batch_stats_function(
    em: Emitter, name: str, *, momentum: str | None, counts: bool = True, instance: bool = False
) -> onnx.FunctionProto:
    """``Y`` normalized with batch statistics over the ``axes`` attribute; with ``momentum``
    also the updated running statistics (see :mod:`export.lowerings._stats`)."""
    train = momentum is not None

    def body(f: Body, x_in, scale, bias, *running):
        x = f.compute(x_in)
        mean, d, var = f.moments(x, "axes")
        y = f.output(f.channel_affine(f.standardize(d, var), scale, bias))
        if not train:
            return y
        n = _stats.count_per_channel(f, x_in, mean)
        if instance:  # per-instance statistics (N, C): the running estimate takes their mean
            nc = f.ints([0, -1])
            mean = f.reduce_mean(f.Reshape(mean, nc), [0])
            var = f.reduce_mean(f.Reshape(var, nc), [0])
        flat = f.ints([-1])
        mean_c, var_c = f.Reshape(mean, flat), f.Reshape(var, flat)
        return y, *_stats.running_update(
            f, mean_c, var_c, n, running, momentum=momentum, counts=counts
        )

    return define(
        em,
        name,
        body,
        inputs=["X", "Scale", "B", *(_stats.STAT_INPUTS if train else ())],
        outputs=["Y", *(_stats.STAT_OUTPUTS if train else ())],
        attributes=["epsilon", "axes", "channel_shape", *(["momentum"] * (momentum == "attr"))],
    )


def _variant(base: str, momentum: str | None) -> str:
    return base + {"attr": "", "cumulative": "Cumulative", "zero": "Frozen", None: ""}[momentum]


def lower_batch_stats(
    em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str], layout: Layout, *, base: str
) -> None:
    """The call of ``<base>BatchStats`` or, updating running statistics, ``<base>Train...``
    (``base``: ``BatchNorm`` or ``InstanceNorm``)."""
    instance = base == "InstanceNorm"
    scale, bias = affine_inputs(em, spec, ins)
    inputs = [ins.x, scale, bias]
    attrs = {"epsilon": spec.eps, **layout.attrs()}
    if spec.update_stats:
        mode = _stats.momentum_mode(spec.momentum, instance=instance)
        name = TrainFunction(_variant(base + "Train", mode))
        fn = batch_stats_function(em, name, momentum=mode, counts=not instance, instance=instance)
        inputs += [ins.running_mean, ins.running_var, ins.num_batches_tracked]
        attrs |= _stats.momentum_attr(spec.momentum)
    else:
        fn = batch_stats_function(em, base + "BatchStats", momentum=None)
    call(em, spec, fn, inputs, outs, **attrs)


def _lower_per_channel(
    em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str], layout: Layout
) -> bool:
    """The forms both BatchNorm layouts share: eps outside the root, or batch statistics.
    False when the layer uses running statistics (the caller's form)."""
    if not spec.eps_in_root:
        lower_eps_outside(em, spec, ins, outs, layout)
    elif spec.batch_stats:
        lower_batch_stats(em, spec, ins, outs, layout, base="BatchNorm")
    else:
        return False
    return True


# Emits: BatchNormalization (eval); function BatchNormTrain / BatchNormBatchStats; function
# NormalizeStdPlusEps (batch statistics, eps outside the root)
@register("batchnorm", eps_outside_root=True)
def lower_batchnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if not _lower_per_channel(em, spec, ins, outs, Layout.channels_first(spec)):
        choose(em, spec, (Form.OP,))
        batch_normalization(em, spec, ins, outs)


# Emits: X * scale + shift (eval); function BatchNormTrain (train); function NormalizeStdPlusEps
# (batch statistics, eps outside the root)
@register("sequence_batchnorm", eps_outside_root=True)
def lower_sequence_batchnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if _lower_per_channel(em, spec, ins, outs, Layout.channels_last(spec)):
        return
    choose(em, spec, (Form.FOLDED,))
    # Folded at export time from the exported running statistics: y = x * s + t.
    s, t = _folded(em, spec, ins)
    scaled = em.fresh(f"{spec.path}.scaled")
    em.node("Mul", [ins.x, s], [scaled], name=node_name(spec, "Mul"))
    op(em, spec, "Add", [scaled, t], outs)


def _folded(em: Emitter, spec: LayerSpec, ins: Inputs) -> tuple[str, str]:
    values = em.initializer_values
    rm = values[ins.running_mean].astype(np.float64)
    rv = values[ins.running_var].astype(np.float64)
    w = values[ins.weight].astype(np.float64) if ins.weight else np.ones_like(rm)
    b = values[ins.bias].astype(np.float64) if ins.bias else np.zeros_like(rm)
    s = w / np.sqrt(rv + spec.eps)
    t = b - rm * s
    dtype = values[ins.running_mean].dtype
    return (
        em.constant(f"{spec.path}.folded_scale", s.astype(dtype)),
        em.constant(f"{spec.path}.folded_shift", t.astype(dtype)),
    )
