"""GroupNorm: the function ``normport.GroupNorm`` (reshape to ``(N, G, -1)``,
InstanceNormalization, reshape back, the per-channel affine as one BatchNormalization) or, from
opset 21, the standard ``GroupNormalization`` (opset 21's per-channel scale and bias,
``stash_type=1``): which one per target is the form table's (:mod:`export.lowerings._choices`;
onnxruntime 1.32 runs the function in about a third of the op's time).  The deprecated opset-18
form, whose scale and bias are per *group*, is never emitted: onnx's checker rejects it in
opsets 18-20.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import affine_inputs, call, op, register
from normport.export.lowerings._body import Body, define
from normport.export.lowerings._choices import Form, choose

STANDARD_OPSET = 21


def _body(f: Body, x_in, scale, bias):
    """Per group: reshape to ``group_shape`` ``(N, G, -1)``, InstanceNormalization with unit
    scale and zero bias, reshape back, then the per-channel affine (:func:`_affine`)."""
    xr = f.Reshape(f.compute(x_in), f.ints("group_shape"))
    groups = f.ints("groups")
    epsilon = ir.RefAttr("epsilon", "epsilon", ir.AttributeType.FLOAT)
    xn = f.InstanceNormalization(xr, f.filled(groups, 1.0), f.filled(groups, 0.0), epsilon=epsilon)
    xb = f.Reshape(xn, f.Shape(x_in))
    return f.output(_affine(f, xb, scale, bias))


def _affine(f: Body, xn, scale, bias):
    """``xn * scale + bias`` per channel of ``(N, C, *)`` ``xn``, as one BatchNormalization with
    mean 0, variance 1 and epsilon 0: :math:`(x - 0) / \\sqrt{1 + 0} \\cdot s + b`, the same
    numbers in one pass over ``xn`` where Mul then Add take two (onnxruntime 1.32, 1 thread,
    (8, 256, 28, 28): the whole function in 0.68x the time of its Mul + Add form).  In opset 13
    that is BatchNormalization-9, inference-only; onnx 1.23's ReferenceEvaluator needs
    ``runtime/verify/_reference.py``'s fix of it to run it inside a function."""
    channels = f.Shape(scale)
    mean, var = f.filled(channels, 0.0), f.filled(channels, 1.0)
    return f.BatchNormalization(xn, f.compute(scale), f.compute(bias), mean, var, epsilon=0.0)


def _function(em: Emitter, spec: LayerSpec) -> onnx.FunctionProto:
    attributes = ["epsilon", "group_shape", "groups"]
    return define(em, "GroupNorm", _body, attributes=attributes)


# Emits: function GroupNorm; GroupNormalization-21 (opset >= 21, where the form table says)
@register("groupnorm")
def lower_groupnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    scale, bias = affine_inputs(em, spec, ins)
    inputs = [ins.x, scale, bias]
    if choose(em, spec, (Form.OP, Form.FUNCTION), op_since=STANDARD_OPSET) is Form.OP:
        attrs = {"num_groups": spec.num_groups, "stash_type": 1}
        op(em, spec, "GroupNormalization", inputs, outs, epsilon=spec.eps, **attrs)
        return
    call(
        em,
        spec,
        _function(em, spec),
        inputs,
        outs,
        epsilon=spec.eps,
        group_shape=[0, spec.num_groups, -1],
        groups=[spec.num_groups],
    )
