"""SwitchableNorm1d/2d: always the function ``normport.SwitchableNorm`` (no standard op).

Instance statistics per ``(N, C)`` over the spatial axes; layer and batch statistics as their
averages with the law of total variance (as :mod:`models.switchable`); softmax-mixed; the batch
branch uses the running statistics in eval, and ``normport.SwitchableNormTrain`` also returns
their update.
"""

from __future__ import annotations

from normport.export._emit import Body, Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import affine_inputs, node_name, register
from normport.export.lowerings._stats import (
    STAT_INPUTS,
    STAT_OUTPUTS,
    count_per_channel,
    momentum_attr,
    momentum_mode,
    running_update,
)
from normport.export.train_graph import TrainFunction


def _total_var(b: Body, mean_in: str, var_in: str, axis: int) -> tuple[str, str]:
    """Mean and variance over ``axis`` of groups with means ``mean_in`` and vars ``var_in``."""
    mean = b.reduce_mean(mean_in, [axis])
    dev, dev2 = b.tmp("dev"), b.tmp("dev2")
    b(f"{dev} = Sub ({mean_in}, {mean})")
    b(f"{dev2} = Mul ({dev}, {dev})")
    within, between, var = b.reduce_mean(var_in, [axis]), b.reduce_mean(dev2, [axis]), b.tmp("var")
    b(f"{var} = Add ({within}, {between})")
    return mean, var


def _mix(b: Body, logits: str, stats: list[str]) -> str:
    w = b.tmp("w")
    b(f"{w} = Softmax <axis = 0> ({b.to_compute(logits)})")
    terms = []
    for i, stat in enumerate(stats):
        idx, wi, term = b.tmp("i"), b.tmp("wi"), b.tmp("term")
        b(f"{idx} = Constant <value = int64 {{{i}}}> ()")
        b(f"{wi} = Gather <axis = 0> ({w}, {idx})")
        b(f"{term} = Mul ({wi}, {stat})")
        terms.append(term)
    out = b.tmp("mix")
    b(f"{out} = Sum ({', '.join(terms)})")
    return out


def switchable_function(em: Emitter, momentum: str | None, batch_stats: bool):
    b = em.body()
    x = b.to_compute("X")
    xr = b.tmp("xr")
    b(f"{xr} = Reshape ({x}, {b.ints([0, 0, -1])})")
    mean_in = b.reduce_mean(xr, [2])
    d, d2 = b.tmp("d"), b.tmp("d2")
    b(f"{d} = Sub ({xr}, {mean_in})")
    b(f"{d2} = Mul ({d}, {d})")
    var_in = b.reduce_mean(d2, [2])
    mean_ln, var_ln = _total_var(b, mean_in, var_in, 1)
    inputs = ["X", "Scale", "B", "mean_weight", "var_weight"]
    outputs = ["Y"]
    attrs = ["epsilon", "channel_shape"]
    if batch_stats:
        mean_bn, var_bn = _total_var(b, mean_in, var_in, 0)
    else:
        stat_axes = b.ints([0, 2])
        mean_bn, var_bn = b.tmp("mean_bn"), b.tmp("var_bn")
        b(f"{mean_bn} = Unsqueeze ({b.to_compute('running_mean')}, {stat_axes})")
        b(f"{var_bn} = Unsqueeze ({b.to_compute('running_var')}, {stat_axes})")
    mean = _mix(b, "mean_weight", [mean_in, mean_ln, mean_bn])
    var = _mix(b, "var_weight", [var_in, var_ln, var_bn])
    eps = b.scalar_attr("epsilon")
    c, ve, std, xn = b.tmp("c"), b.tmp("ve"), b.tmp("std"), b.tmp("xn")
    b(f"{c} = Sub ({xr}, {mean})")
    b(f"{ve} = Add ({var}, {eps})")
    b(f"{std} = Sqrt ({ve})")
    b(f"{xn} = Div ({c}, {std})")
    shape, xb = b.tmp("shape"), b.tmp("xb")
    b(f"{shape} = Shape (X)")
    b(f"{xb} = Reshape ({xn}, {shape})")
    b.to_output(b.channel_affine(xb), "Y")
    name = "SwitchableNorm"
    if momentum is not None:
        n = count_per_channel(b, xr, mean_bn)
        flat = b.ints([-1])
        b(f"mean_flat = Reshape ({mean_bn}, {flat})")
        b(f"var_flat = Reshape ({var_bn}, {flat})")
        running_update(b, "mean_flat", "var_flat", n, momentum=momentum, counts=True)
        train = TrainFunction.SWITCHABLE
        name = TrainFunction.SWITCHABLE_CUMULATIVE if momentum == "cumulative" else train
        attrs += ["momentum"] if momentum == "attr" else []
        inputs[3:3] = list(STAT_INPUTS)
        outputs += list(STAT_OUTPUTS)
    elif batch_stats:
        name += "BatchStats"
    else:
        inputs[3:3] = list(STAT_INPUTS[:2])
    return b.function(name, attrs, inputs, outputs)


# Emits: function SwitchableNorm / SwitchableNormTrain / SwitchableNormBatchStats
@register("switchable")
def lower_switchable(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if spec.rank < 3:
        raise ValueError(f"cannot export {spec.path!r} ({spec.cls}) on a {spec.rank}D input")
    scale, bias = affine_inputs(em, spec, ins)
    mode = momentum_mode(spec.momentum) if spec.update_stats else None
    fn = switchable_function(em, mode, spec.batch_stats)
    attrs = {"epsilon": spec.eps, "channel_shape": [spec.channels] + [1] * (spec.rank - 2)}
    head = [ins.x, scale, bias]
    tail = [ins.mean_weight, ins.var_weight]
    if spec.update_stats:
        attrs |= momentum_attr(spec.momentum)
        stats = [ins.running_mean, ins.running_var, ins.num_batches_tracked]
        em.call(fn, head + stats + tail, outs, name=node_name(spec, fn.name), **attrs)
    elif spec.batch_stats:
        em.call(fn, head + tail, outs[:1], name=node_name(spec, fn.name), **attrs)
    else:
        stats = [ins.running_mean, ins.running_var]
        em.call(fn, head + stats + tail, outs[:1], name=node_name(spec, fn.name), **attrs)
