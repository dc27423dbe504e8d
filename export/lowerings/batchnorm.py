"""BatchNorm1d/2d/3d and SequenceBatchNorm.

- eval (running statistics): ``BatchNormalization`` (every opset 13-28).  SequenceBatchNorm's
  channel-last ``(N, L, C)`` input gets the folded per-channel form ``X * s + t`` instead of
  ``Transpose -> BatchNormalization -> Transpose`` (faster: see ``make bench``, export.json).
- batch statistics (training, or ``track_running_stats=False``): the function
  ``normport.BatchNormTrain`` (updating running statistics) or ``normport.BatchNormBatchStats``;
  with eps outside the root (hand-written, ``eps_in_root=False``): ``normport.NormalizeStdPlusEps``.
"""

from __future__ import annotations

import numpy as np

from normport.export._emit import Body, Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import affine_inputs, batch_normalization, node_name, register
from normport.export.lowerings._stats import (
    STAT_INPUTS,
    STAT_OUTPUTS,
    count_per_channel,
    momentum_attr,
    momentum_mode,
    running_update,
)
from normport.export.lowerings.eps_outside import lower_eps_outside
from normport.export.train_graph import TrainFunction

__all__ = ["batch_stats_function", "lower_batchnorm"]


def batch_stats_function(
    em: Emitter, name: str, *, momentum: str | None, counts: bool = True, instance: bool = False
):
    """``Y`` normalized with batch statistics over ``@axes``; with ``momentum`` also the
    updated running statistics (see :mod:`export.lowerings._stats`)."""
    b: Body = em.body()
    x = b.to_compute("X")
    mean = b.reduce_mean(x, "@axes")
    d, d2 = b.tmp("d"), b.tmp("d2")
    b(f"{d} = Sub ({x}, {mean})")
    b(f"{d2} = Mul ({d}, {d})")
    var = b.reduce_mean(d2, "@axes")
    eps = b.scalar_attr("epsilon")
    ve, std, xn = b.tmp("ve"), b.tmp("std"), b.tmp("xn")
    b(f"{ve} = Add ({var}, {eps})")
    b(f"{std} = Sqrt ({ve})")
    b(f"{xn} = Div ({d}, {std})")
    b.to_output(b.channel_affine(xn), "Y")
    attrs = ["epsilon", "axes", "channel_shape"]
    inputs, outputs = ["X", "Scale", "B"], ["Y"]
    if momentum is not None:
        n = count_per_channel(b, "X", mean)
        flat = b.ints([-1])
        if instance:  # per-instance statistics (N, C): the running estimate takes their mean
            nc = b.ints([0, -1])
            for stat in (mean, var):
                b(f"{stat}_nc = Reshape ({stat}, {nc})")
            mean_c, var_c = b.reduce_mean(f"{mean}_nc", [0]), b.reduce_mean(f"{var}_nc", [0])
        else:
            mean_c, var_c = mean, var
        b(f"mean_flat = Reshape ({mean_c}, {flat})")
        b(f"var_flat = Reshape ({var_c}, {flat})")
        running_update(b, "mean_flat", "var_flat", n, momentum=momentum, counts=counts)
        attrs += ["momentum"] if momentum == "attr" else []
        inputs += list(STAT_INPUTS)
        outputs += list(STAT_OUTPUTS)
    return b.function(name, attrs, inputs, outputs)


def _variant(base: str, momentum: str | None) -> str:
    return base + {"attr": "", "cumulative": "Cumulative", "zero": "Frozen", None: ""}[momentum]


def lower_batch_stats(
    em: Emitter,
    spec: LayerSpec,
    ins: Inputs,
    outs: list[str],
    *,
    axes: list[int],
    channel_shape: list[int],
    base: str,
    instance: bool = False,
) -> None:
    scale, bias = affine_inputs(em, spec, ins)
    attrs = {"epsilon": spec.eps, "axes": axes, "channel_shape": channel_shape}
    if spec.update_stats:
        mode = momentum_mode(spec.momentum, instance=instance)
        fn = batch_stats_function(
            em,
            TrainFunction(_variant(base + "Train", mode)),
            momentum=mode,
            counts=not instance,
            instance=instance,
        )
        attrs |= momentum_attr(spec.momentum)
        stats = [ins.running_mean, ins.running_var, ins.num_batches_tracked]
        em.call(fn, [ins.x, scale, bias, *stats], outs, name=node_name(spec, fn.name), **attrs)
    else:
        fn = batch_stats_function(em, base + "BatchStats", momentum=None)
        em.call(fn, [ins.x, scale, bias], outs[:1], name=node_name(spec, fn.name), **attrs)


# Emits: BatchNormalization (eval); function BatchNormTrain / BatchNormBatchStats; function
# NormalizeStdPlusEps (batch statistics, eps outside the root)
@register("batchnorm", eps_outside_root=True)
def lower_batchnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    axes, channel_shape = [0, *range(2, spec.rank)], [spec.channels] + [1] * (spec.rank - 2)
    if not spec.eps_in_root:
        lower_eps_outside(em, spec, ins, outs, axes=axes, channel_shape=channel_shape)
        return
    if spec.batch_stats:
        lower_batch_stats(
            em,
            spec,
            ins,
            outs,
            axes=axes,
            channel_shape=channel_shape,
            base="BatchNorm",
        )
        return
    batch_normalization(em, spec, ins, outs)


# Emits: X * scale + shift (eval); function BatchNormTrain (train); function NormalizeStdPlusEps
# (batch statistics, eps outside the root)
@register("sequence_batchnorm", eps_outside_root=True)
def lower_sequence_batchnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if not spec.eps_in_root:
        axes = list(range(spec.rank - 1))
        lower_eps_outside(em, spec, ins, outs, axes=axes, channel_shape=[spec.channels])
        return
    if spec.batch_stats:
        lower_batch_stats(
            em,
            spec,
            ins,
            outs,
            axes=list(range(spec.rank - 1)),
            channel_shape=[spec.channels],
            base="BatchNorm",
        )
        return
    # Folded at export time from the exported running statistics: y = x * s + t.
    s, t = _folded(em, spec, ins)
    scaled = em.fresh(f"{spec.path}.scaled")
    em.node("Mul", [ins.x, s], [scaled], name=node_name(spec, "Mul"))
    em.node("Add", [scaled, t], outs[:1], name=node_name(spec, "Add"))


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
