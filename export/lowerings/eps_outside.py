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

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import affine_inputs, node_name

__all__ = ["FUNCTION", "lower_eps_outside"]

FUNCTION = "NormalizeStdPlusEps"


def _function(em: Emitter):
    b = em.body()
    x = b.to_compute("X")
    mean = b.reduce_mean(x, "@axes")
    d, d2 = b.tmp("d"), b.tmp("d2")
    b(f"{d} = Sub ({x}, {mean})")
    b(f"{d2} = Mul ({d}, {d})")
    var = b.reduce_mean(d2, "@axes")
    eps = b.scalar_attr("epsilon")
    std, den, xn = b.tmp("std"), b.tmp("den"), b.tmp("xn")
    b(f"{std} = Sqrt ({var})")
    b(f"{den} = Add ({std}, {eps})")
    b(f"{xn} = Div ({d}, {den})")
    b.to_output(b.channel_affine(xn), "Y")
    return b.function(FUNCTION, ["epsilon", "axes", "channel_shape"], ["X", "Scale", "B"], ["Y"])


def lower_eps_outside(
    em: Emitter,
    spec: LayerSpec,
    ins: Inputs,
    outs: list[str],
    *,
    axes: list[int],
    channel_shape: list[int],
) -> None:
    """One ``normport.NormalizeStdPlusEps`` call: statistics over ``axes``, ``Scale`` and
    ``B`` reshaped to ``channel_shape`` (``[C, 1, 1]`` for ``(N, C, H, W)``, the normalized
    shape for a LayerNorm)."""
    if spec.update_stats or not spec.batch_stats:
        raise ValueError(
            f"layer {spec.path or '<root>'!r} ({spec.cls}, kind {spec.kind!r}): eps outside "
            "the root is exported with batch statistics only, not with running statistics "
            f"(batch_stats={spec.batch_stats}, update_stats={spec.update_stats})"
        )
    shape = tuple(channel_shape) if spec.kind == "layernorm" else (spec.channels,)
    scale, bias = affine_inputs(em, spec, ins, shape)
    fn = _function(em)
    em.call(
        fn,
        [ins.x, scale, bias],
        outs[:1],
        name=node_name(spec, fn.name),
        epsilon=spec.eps,
        axes=axes,
        channel_shape=channel_shape,
    )
