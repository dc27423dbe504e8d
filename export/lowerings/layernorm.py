"""LayerNorm and RMSNorm over the trailing ``k`` axes: the standard op or the function, as the
form table says per opset and target (:mod:`export.lowerings._choices`).

- LayerNorm: ``LayerNormalization`` (``axis=-k``, ``stash_type=1``, opset >= 17) or the
  function ``normport.LayerNorm``, written as the textbook ReduceMean / Sub / Pow / ReduceMean /
  Add / Sqrt / Div / Mul / Add chain that onnxruntime re-fuses into its LayerNorm kernel.
  With eps outside the root (``eps_in_root=False``): ``normport.NormalizeStdPlusEps`` at
  every opset (:mod:`export.lowerings.eps_outside`).
- RMSNorm: ``RMSNormalization`` (opset >= 23) or the function ``normport.RMSNorm``
  (Pow / ReduceMean / Add / Sqrt / Div / Mul, onnxruntime's SimplifiedLayerNorm pattern).
"""

from __future__ import annotations

import onnx

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import Layout, affine_inputs, call, op, register
from normport.export.lowerings._body import Body, define
from normport.export.lowerings._choices import Form, choose
from normport.export.lowerings.eps_outside import lower_eps_outside

LAYERNORM_OPSET = 17
RMSNORM_OPSET = 23


def _function(em: Emitter, *, center: bool) -> onnx.FunctionProto:
    """LayerNorm (``center``) or RMSNorm over the ``axes`` attribute, as the Pow / ReduceMean
    chain onnxruntime fuses."""

    def body(f: Body, x_in, scale, bias=None):
        x = f.compute(x_in)
        d = f.Sub(x, f.reduce_mean(x, "axes")) if center else x
        var = f.reduce_mean(f.Pow(d, f.scalar(2.0)), "axes")
        y = f.Mul(f.standardize(d, var), f.compute(scale))
        return f.output(f.Add(y, f.compute(bias)) if center else y)

    inputs = ["X", "Scale", *(["B"] * center)]
    name = "LayerNorm" if center else "RMSNorm"
    return define(em, name, body, inputs=inputs, attributes=["axes", "epsilon"])


def _lower(
    em: Emitter, spec: LayerSpec, inputs: list[str], outs: list[str], *, form: Form, center: bool
) -> None:
    """The standard op (``axis=-k``, ``stash_type=1``: float32 statistics) or the function;
    ``inputs``: X, Scale and, for LayerNorm, B."""
    standard = "LayerNormalization" if center else "RMSNormalization"
    if form is Form.OP:
        attrs = {"axis": -spec.normalized_ndim, "stash_type": 1}
        op(em, spec, standard, inputs, outs, epsilon=spec.eps, **attrs)
        return
    fn = _function(em, center=center)
    call(em, spec, fn, inputs, outs, axes=list(Layout.trailing(spec).axes), epsilon=spec.eps)


# Emits: LayerNormalization (opset >= 17) or function LayerNorm (form table); function
# NormalizeStdPlusEps (eps outside the root)
@register("layernorm", eps_outside_root=True)
def lower_layernorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if not spec.eps_in_root:
        lower_eps_outside(em, spec, ins, outs, Layout.trailing(spec))
        return
    form = choose(em, spec, (Form.OP, Form.FUNCTION), op_since=LAYERNORM_OPSET)
    scale, bias = affine_inputs(em, spec, ins, tuple(spec.normalized_shape))
    if form is Form.OP:  # B is optional there: no zeros for bias=False
        bias = ins.bias
    _lower(em, spec, [ins.x, scale, *([bias] if bias else [])], outs, form=form, center=True)


# Emits: RMSNormalization (opset >= 23) or function RMSNorm (form table)
@register("rmsnorm")
def lower_rmsnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    # eps=None was resolved at trace time to finfo(input dtype).eps
    form = choose(em, spec, (Form.OP, Form.FUNCTION), op_since=RMSNORM_OPSET)
    scale, _ = affine_inputs(em, spec, ins, tuple(spec.normalized_shape))
    _lower(em, spec, [ins.x, scale], outs, form=form, center=False)
