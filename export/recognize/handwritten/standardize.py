"""LayerNorm and batch-statistics BatchNorm written out: ``(x - mean) / sqrt(var + eps)``.

.. math::

    y = w \\cdot \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + b
    \\quad\\text{or, eps outside the root,}\\quad
    y = w \\cdot \\frac{x - \\mu}{\\sigma + \\epsilon} + b

with :math:`\\mu`, :math:`\\sigma^2` the mean and the *biased* variance over the same axes.
The matched subgraph::

    x ─┬─► mean(D, keepdim) ─────────────┐
       ├─────────────────────────────► sub ──────────────────────┐
       └─► var(D, correction=0, keepdim)                          │
           | mean((x - mean)^2, D, keepdim) ─► + eps ─► sqrt ─► div ─► [mul w] ─► [add b] ─► y
                                                       (rsqrt ─► mul)

    eps outside the root:  std(D, correction=0) | sqrt(var) ─► + eps ─► div

``var_mean`` / ``std_mean`` count as their two reductions; the two ``x - mean`` of
``((x - m) ** 2).mean()`` and the numerator may be separate nodes (export does no CSE).

The axes ``D`` say the kind (:func:`export.recognize.handwritten._match.layout`): the trailing
``k`` axes -> ``layernorm``; all but axis 1 of ``(N, C, *S)`` -> ``batchnorm``; ``(0, 1)`` of a
channel-last ``(N, L, C)`` -> ``sequence_batchnorm``, both with batch statistics.  The eps
outside the root is its own math (``eps_in_root=False``), never the standard op with an eps
nearby: it lowers to the function ``normport.NormalizeStdPlusEps`` at every opset.

Not matched: the unbiased variance (the default of ``var`` / ``std``), mean and variance over
different axes, eps elsewhere (``rsqrt(var) + eps``), other axes (``(0, 2)`` of a 4-D input),
another exponent, a mean or variance also read elsewhere.
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
    Stat,
    casts_ok,
    centered,
    normalized,
    quotient,
    root,
    same_value,
    square_of,
    statistic,
    strip_casts,
    with_eps,
)

__all__ = ["recognize_standardize"]


def _variance(v, mean: fx.Node) -> Stat | None:
    """``var(x, correction=0)`` or ``mean((x - mean) ** 2)``, centred on ``mean``."""
    if (stat := statistic(v, ("var",))) is not None:
        return stat
    if (stat := statistic(v, ("mean",))) is None or (square := square_of(stat.x)) is None:
        return None
    if (c := centered(square[0])) is None or not same_value(c[1], mean):
        return None
    return Stat("var", c[0], stat.dims, [*stat.nodes, *square[1], c[2]])


def _std(s, mean: fx.Node) -> Stat | None:
    """``std(x, correction=0)`` or the root of a biased variance."""
    if (stat := statistic(s, ("std",))) is not None:
        return stat
    if (found := root(s)) is None or (var := _variance(found[0], mean)) is None:
        return None
    return Stat("std", var.x, var.dims, [*found[1], *var.nodes])


def _spread(g: Graph, node: fx.Node):
    """``(numerator, eps, eps_in_root, eps add, spread statistic, nodes)`` of ``node``."""
    # eps inside the root: x_c * rsqrt(var + eps); outside: x_c / (std + eps)
    for split, eps_in_root, spread_of in ((normalized, True, _variance), (quotient, False, _std)):
        if (found := split(node)) is None or (eps_add := with_eps(g, found[1])) is None:
            continue
        numerator, _, nodes = found
        c = centered(numerator)
        if c is not None and (stat := spread_of(eps_add[0], c[1])) is not None:
            return numerator, eps_add[1], eps_in_root, eps_add[2], stat, nodes
    return None


def match_standardize(g: Graph, node: fx.Node) -> Match | None:
    """The LayerNorm / BatchNorm whose normalized value is ``node``, or None."""
    if (spread := _spread(g, node)) is None:
        return None
    numerator, eps, eps_in_root, add, spread_stat, core = spread
    x_num, mean_node, sub = centered(numerator)
    if (mean := statistic(mean_node, ("mean",))) is None or mean.dims != spread_stat.dims:
        return None
    roots = [strip_casts(v) for v in (x_num, mean.x, spread_stat.x)]
    x, casts = roots[0][0], [c for _, chain in roots for c in chain]
    if not all(same_value(x, r) for r, _ in roots) or not casts_ok(x, casts):
        return None
    if (axes := layout(g.val(x).shape, mean.dims)) is None:
        return None
    private = [*core, sub, add, *mean.nodes, *spread_stat.nodes]
    return finish_match(
        g,
        node,
        x,
        axes,
        private,
        casts,
        kind=axes[0],
        bias=True,
        eps=eps,
        batch_stats=True,
        eps_in_root=eps_in_root,
    )


def recognize_standardize(g: Graph) -> None:
    """Replace every hand-written LayerNorm / batch-statistics BatchNorm with a placeholder."""
    apply_rule(g, match_standardize)
