"""SwitchableNorm1d/2d: always the function ``normport.SwitchableNorm`` (no standard op).

Instance statistics per ``(N, C)`` over the spatial axes; layer and batch statistics as their
averages with the law of total variance (as :mod:`models.switchable`); softmax-mixed; the batch
branch uses the running statistics in eval, and ``normport.SwitchableNormTrain`` also returns
their update.
"""

from __future__ import annotations

import onnx

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import Layout, _stats, affine_inputs, call, register
from normport.export.lowerings._body import Body, define
from normport.export.train_graph import TrainFunction


def _total_var(f: Body, mean_in, var_in, axis: int):
    """Mean and variance over ``axis`` of groups with means ``mean_in`` and vars ``var_in``:
    :math:`\\sigma^2 = \\overline{\\sigma_i^2} + \\overline{(\\mu_i - \\mu)^2}`."""
    mean = f.reduce_mean(mean_in, [axis])
    dev = f.Sub(mean_in, mean)
    return mean, f.Add(f.reduce_mean(var_in, [axis]), f.reduce_mean(f.Mul(dev, dev), [axis]))


def _mix(f: Body, logits, stats):
    """:math:`\\sum_k \\mathrm{softmax}(\\text{logits})_k \\cdot \\text{stat}_k`."""
    w = f.Softmax(f.compute(logits), axis=0)
    return f.Sum(*(f.Mul(f.Gather(w, f.int64(k), axis=0), s) for k, s in enumerate(stats)))


def switchable_function(em: Emitter, momentum: str | None, batch_stats: bool) -> onnx.FunctionProto:
    """``SwitchableNorm`` (running statistics in the batch branch), ``...BatchStats`` or, with
    ``momentum``, ``SwitchableNormTrain[Cumulative]`` (also the running update)."""
    train = momentum is not None
    inputs = ["X", "Scale", "B", "mean_weight", "var_weight"]
    if train:
        inputs[3:3] = _stats.STAT_INPUTS
    elif not batch_stats:
        inputs[3:3] = _stats.STAT_INPUTS[:2]

    def body(f: Body, *values):
        v = dict(zip(inputs, values, strict=True))
        x_in = v["X"]
        xr = f.Reshape(f.compute(x_in), f.ints([0, 0, -1]))
        mean_in, _, var_in = f.moments(xr, [2])
        mean_ln, var_ln = _total_var(f, mean_in, var_in, 1)
        if batch_stats:
            mean_bn, var_bn = _total_var(f, mean_in, var_in, 0)
        else:
            stat_axes = f.ints([0, 2])
            mean_bn = f.Unsqueeze(f.compute(v["running_mean"]), stat_axes)
            var_bn = f.Unsqueeze(f.compute(v["running_var"]), stat_axes)
        mean = _mix(f, v["mean_weight"], [mean_in, mean_ln, mean_bn])
        var = _mix(f, v["var_weight"], [var_in, var_ln, var_bn])
        xn = f.Reshape(f.standardize(f.Sub(xr, mean), var), f.Shape(x_in))
        y = f.output(f.channel_affine(xn, v["Scale"], v["B"]))
        if not train:
            return y
        n = _stats.count_per_channel(f, xr, mean_bn)
        flat = f.ints([-1])
        running = (v["running_mean"], v["running_var"], v["num_batches_tracked"])
        mean_c, var_c = f.Reshape(mean_bn, flat), f.Reshape(var_bn, flat)
        return y, *_stats.running_update(
            f, mean_c, var_c, n, running, momentum=momentum, counts=True
        )

    if train:
        cumulative = momentum == "cumulative"
        name = TrainFunction.SWITCHABLE_CUMULATIVE if cumulative else TrainFunction.SWITCHABLE
    else:
        name = "SwitchableNormBatchStats" if batch_stats else "SwitchableNorm"
    return define(
        em,
        name,
        body,
        inputs=inputs,
        outputs=["Y", *(_stats.STAT_OUTPUTS if train else ())],
        attributes=["epsilon", "channel_shape", *(["momentum"] * (momentum == "attr"))],
    )


# Emits: function SwitchableNorm / SwitchableNormTrain / SwitchableNormBatchStats
@register("switchable")
def lower_switchable(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if spec.rank < 3:
        raise ValueError(f"cannot export {spec.path!r} ({spec.cls}) on a {spec.rank}D input")
    scale, bias = affine_inputs(em, spec, ins)
    mode = _stats.momentum_mode(spec.momentum) if spec.update_stats else None
    fn = switchable_function(em, mode, spec.batch_stats)
    attrs = {"epsilon": spec.eps, "channel_shape": list(Layout.channels_first(spec).channel_shape)}
    stats = [ins.running_mean, ins.running_var]
    if spec.update_stats:
        attrs |= _stats.momentum_attr(spec.momentum)
        stats.append(ins.num_batches_tracked)
    elif spec.batch_stats:
        stats = []
    inputs = [ins.x, scale, bias, *stats, ins.mean_weight, ins.var_weight]
    call(em, spec, fn, inputs, outs, **attrs)
