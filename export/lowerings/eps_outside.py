"""Normalization with the eps *outside* the root: ``(x - mean) / (std + eps)``.

.. math::

    y = w \\cdot \\frac{x - \\mu}{\\sqrt{\\sigma^2} + \\epsilon} + b

with :math:`\\mu`, :math:`\\sigma^2` the mean and the biased variance over ``axes``.  No
standard op computes this: :math:`\\sqrt{\\sigma^2} + \\epsilon \\ne \\sqrt{\\sigma^2 +
\\epsilon'}` for any constant :math:`\\epsilon'`, so a LayerNormalization "with a nearby eps"
would be wrong exactly where eps matters (near-constant rows: ``var = 0`` gives ``d / eps``
here, ``d / sqrt(eps)`` there).  Every opset gets the function ``normport.NormalizeStdPlusEps``
(hand-written LayerNorms such as the annotated Transformer's, ``x.std(unbiased=False)``).

Layers whose spec says ``eps_in_root=False`` and this module serves: ``layernorm`` (the
trailing axes) and batch-statistics ``batchnorm`` / ``sequence_batchnorm``.  Any other kind
raises in :func:`export.lowerings.lowering_for`.
"""

from __future__ import annotations

import onnx

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import Layout, affine_inputs, call
from normport.export.lowerings._body import Body, define

__all__ = ["FUNCTION", "lower_eps_outside"]

FUNCTION = "NormalizeStdPlusEps"


def _body(f: Body, x_in, scale, bias):
    _, d, var = f.moments(f.compute(x_in), "axes")
    xn = f.Div(d, f.Add(f.Sqrt(var), f.float_attr("epsilon")))
    return f.output(f.channel_affine(xn, scale, bias))


def _function(em: Emitter) -> onnx.FunctionProto:
    return define(em, FUNCTION, _body, attributes=["epsilon", "axes", "channel_shape"])


def lower_eps_outside(
    em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str], layout: Layout
) -> None:
    """One ``normport.NormalizeStdPlusEps`` call with statistics over ``layout.axes``."""
    if spec.update_stats or not spec.batch_stats:
        raise ValueError(
            f"layer {spec.path or '<root>'!r} ({spec.cls}, kind {spec.kind!r}): eps outside "
            "the root is exported with batch statistics only, not with running statistics "
            f"(batch_stats={spec.batch_stats}, update_stats={spec.update_stats})"
        )
    shape = layout.channel_shape if spec.kind == "layernorm" else (spec.channels,)
    scale, bias = affine_inputs(em, spec, ins, shape)
    call(em, spec, _function(em), [ins.x, scale, bias], outs, epsilon=spec.eps, **layout.attrs())
