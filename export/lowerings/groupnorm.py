"""GroupNorm: ``GroupNormalization`` (opset 21's per-channel scale and bias, ``stash_type=1``)
from opset 21; below it the function ``normport.GroupNorm`` (reshape to ``(N, G, -1)``,
InstanceNormalization, reshape back, per-channel affine).  The deprecated opset-18 form, whose
scale and bias are per *group*, is never emitted: onnx's checker rejects it in opsets 18-20.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import Layout, affine_inputs, call, op, register
from normport.export.lowerings._body import Body, define

STANDARD_OPSET = 21


def _body(f: Body, x_in, scale, bias):
    """Per group: reshape to ``group_shape`` ``(N, G, -1)``, InstanceNormalization with unit
    scale and zero bias, reshape back, then the per-channel affine."""
    xr = f.Reshape(f.compute(x_in), f.ints("group_shape"))
    groups = f.ints("groups")
    epsilon = ir.RefAttr("epsilon", "epsilon", ir.AttributeType.FLOAT)
    xn = f.InstanceNormalization(xr, f.filled(groups, 1.0), f.filled(groups, 0.0), epsilon=epsilon)
    xb = f.Reshape(xn, f.Shape(x_in))
    return f.output(f.channel_affine(xb, scale, bias))


def _function(em: Emitter) -> onnx.FunctionProto:
    attributes = ["epsilon", "group_shape", "groups", "channel_shape"]
    return define(em, "GroupNorm", _body, attributes=attributes)


# Emits: GroupNormalization-21 (opset >= 21); function GroupNorm below
@register("groupnorm")
def lower_groupnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    scale, bias = affine_inputs(em, spec, ins)
    inputs = [ins.x, scale, bias]
    if em.opset >= STANDARD_OPSET:
        attrs = {"num_groups": spec.num_groups, "stash_type": 1}
        op(em, spec, "GroupNormalization", inputs, outs, epsilon=spec.eps, **attrs)
        return
    call(
        em,
        spec,
        _function(em),
        inputs,
        outs,
        epsilon=spec.eps,
        group_shape=[0, spec.num_groups, -1],
        groups=[spec.num_groups],
        channel_shape=list(Layout.channels_first(spec).channel_shape),
    )
