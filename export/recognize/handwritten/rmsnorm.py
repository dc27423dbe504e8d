"""RMSNorm written out: transformers' ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` / ``T5LayerNorm``.

.. math::

    y = w \\cdot \\frac{x}{\\sqrt{\\operatorname{mean}(x^2) + \\epsilon}}

over the trailing axes (``mean(-1, keepdim=True)``: the last one), statistics in float32 for
half inputs.  The matched subgraph (LLaMA; T5 multiplies the *uncast* x by the rsqrt, which
type promotion computes in float32 all the same)::

    x ─► to(float32)? ─┬───────────────────────────────────────────┐
                       └► pow 2 | x*x ─► mean(-k.., keepdim) ─► + eps ─► rsqrt ─► mul
                                                                                  │
       y ◄─ [to(x.dtype)] ◄─ [mul w] ◄─ [to(x.dtype)] ◄───────────────────────────┘

Also ``x / sqrt(. + eps)``, ``x * (1 / sqrt(.))``, ``(. + eps) ** -0.5``, ``square(x)``, the
weight on either side, no weight.  It becomes ``kind="rmsnorm"``: ``RMSNormalization`` from
opset 23, the function ``normport.RMSNorm`` below.

Not matched: eps anywhere but under the root (``rsqrt(ms) + eps``), a reduction over other
than the trailing axes, another exponent, the mean of squares also read elsewhere, a cast to a
narrower type inside the statistics, and ``x = v - mean(v)`` over the same axes (a LayerNorm
that :mod:`.standardize` left alone because its mean or variance is read elsewhere: matching
its centred part as an RMSNorm would undo that decision).  A weight of another dtype than x
(``T5LayerNorm`` with float32 weights on half activations returns float32) ends the match
before the weight; then the output's dtype is not the input's and nothing is matched.
"""

from __future__ import annotations

from torch import fx

from normport.export.recognize._graph import Graph
from normport.export.recognize.handwritten._match import (
    Match,
    apply_rule,
    finish_match,
    layout,
)
from normport.export.recognize.handwritten._spellings import (
    casts_ok,
    centered,
    normalized,
    same_value,
    square_of,
    statistic,
    strip_casts,
    with_eps,
)

__all__ = ["recognize_rmsnorm"]


def _centred(x: fx.Node, dims: tuple[int, ...]) -> bool:
    """``x = v - mean(v)`` over the same axes: a LayerNorm that :mod:`.standardize` left alone
    (its mean or variance is read elsewhere), not an RMSNorm of a centred value."""
    if (c := centered(x)) is None or (mean := statistic(c[1], ("mean",))) is None:
        return False
    return mean.dims == dims and same_value(strip_casts(c[0])[0], strip_casts(mean.x)[0])


def match_rmsnorm(g: Graph, node: fx.Node) -> Match | None:
    """The RMSNorm whose normalized value ``x * rsqrt(...)`` is ``node``, or None."""
    if (found := normalized(node)) is None:
        return None
    numerator, radicand, core = found
    if (eps_add := with_eps(g, radicand)) is None:
        return None
    mean_square, eps, add = eps_add
    if (stat := statistic(mean_square, ("mean",))) is None:
        return None
    if (square := square_of(stat.x)) is None:
        return None
    base, square_nodes = square
    x, casts = strip_casts(numerator)
    x_stat, stat_casts = strip_casts(base)
    if not same_value(x, x_stat) or not casts_ok(x, casts + stat_casts):
        return None
    if _centred(x, stat.dims):
        return None
    axes = layout(g.val(x).shape, stat.dims)
    if axes is None or axes[0] != "layernorm":
        return None
    private = [*core, add, *stat.nodes, *square_nodes]
    return finish_match(
        g, node, x, axes, private, casts + stat_casts, kind="rmsnorm", bias=False, eps=eps
    )


def recognize_rmsnorm(g: Graph) -> None:
    """Replace every hand-written RMSNorm of ``g`` with a placeholder."""
    apply_rule(g, match_rmsnorm)
