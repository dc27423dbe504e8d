"""Eval BatchNorm written out with its running buffers: ``(x - rm) / sqrt(rv + eps) * w + b``.

.. math::

    y = w_c \\frac{x - \\hat\\mu_c}{\\sqrt{\\hat\\sigma^2_c + \\epsilon}} + b_c

with ``rm``, ``rv`` (and ``w``, ``b``) per-channel ``(C,)`` parameters or buffers, viewed to
broadcast along the channel axis: ``(1, C, 1, ...)`` for ``(N, C, *S)`` -> ``batchnorm``,
``(1, 1, C)`` for a channel-last ``(N, L, C)`` -> ``sequence_batchnorm``, both with
``batch_stats=False`` (in train exports too: the forward never reads batch statistics).
The matched subgraph::

    rm ─► view ──────┐
    x ─────────────► sub ─────────────────────────► div ─► [mul w.view] ─► [add b.view] ─► y
    rv ─► view ─► + eps ─► sqrt ─► (view) ─────────┘
                           (rsqrt ─► mul)

The views may sit anywhere on the buffer side (``sqrt(rv + eps).view(1, -1, 1, 1)``); what
counts is how each operand finally broadcasts against x.  Not matched: eps outside the root,
statistics that are computed from x (:mod:`.standardize`), operands that broadcast along
another axis, buffers of another dtype than x.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from normport.export.recognize._graph import Graph, Slots, is_op
from normport.export.recognize.handwritten._match import (
    Match,
    affine_tail,
    apply_rule,
    broadcast_shape,
    handwritten_spec,
)
from normport.export.recognize.handwritten._spellings import (
    aten,
    casts_ok,
    centered,
    commuted,
    inverse_root,
    quotient,
    root,
    strip_casts,
    strip_shapes,
    with_eps,
)

__all__ = ["buffer_of", "channel_layout", "eps_root", "recognize_running"]


def buffer_of(g: Graph, node, channels: int, dtype: torch.dtype) -> fx.Node | None:
    """The ``(C,)`` parameter or buffer of ``dtype`` under views of ``node``, or None."""
    if not isinstance(node, fx.Node):
        return None
    base = strip_shapes(node)[0]
    val = g.val(base)
    if g.constant(base) and tuple(val.shape) == (channels,) and val.dtype == dtype:
        return base
    return None


def eps_root(
    g: Graph, node, channels: int, dtype: torch.dtype, *, inverse: bool
) -> tuple[fx.Node, float] | None:
    """``sqrt(rv + eps)`` (``rsqrt`` with ``inverse``) of a ``(C,)`` buffer -> ``(rv, eps)``."""
    inner = strip_shapes(node)[0] if isinstance(node, fx.Node) else None
    found = (inverse_root if inverse else root)(inner)
    if found is None or g.val(inner).numel() != channels:
        return None
    eps_add = with_eps(g, strip_shapes(found[0])[0])
    if eps_add is None or g.val(eps_add[2]).numel() != channels:
        return None
    rv = buffer_of(g, eps_add[0], channels, dtype)
    return (rv, eps_add[1]) if rv is not None else None


def channel_layout(shape: Sequence, operand: fx.Node) -> tuple[str, tuple, int] | None:
    """``(kind, broadcast shape, C)`` from how a per-channel ``operand`` meets x's ``shape``."""
    rank = len(shape)
    seen = broadcast_shape(operand, rank)
    if rank >= 2 and isinstance(shape[1], int) and seen == (1, shape[1]) + (1,) * (rank - 2):
        return "batchnorm", seen, shape[1]
    if rank == 3 and isinstance(shape[2], int) and seen == (1, 1, shape[2]):
        return "sequence_batchnorm", seen, shape[2]
    return None


def _divisor(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """``(numerator, divisor, inverse)``: ``a / d`` (inverse False) or ``a * inv``."""
    if (q := quotient(node)) is not None:
        return q[0], q[1], False
    if is_op(node, aten.mul):
        for a, inv in commuted(node):
            if centered(a) is not None:
                return a, inv, True
    return None


def match_running(g: Graph, node: fx.Node) -> Match | None:
    """The running-statistics BatchNorm whose normalized value is ``node``, or None."""
    if (found := _divisor(node)) is None or (c := centered(found[0])) is None:
        return None
    _, divisor, inverse = found
    x_raw, rm_view, sub = c
    x, casts = strip_casts(x_raw)
    if not casts_ok(x, casts) or not isinstance(rm_view, fx.Node):
        return None
    shape, dtype = g.val(x).shape, g.val(x).dtype
    if (found_layout := channel_layout(shape, rm_view)) is None:
        return None
    kind, expect, channels = found_layout
    if broadcast_shape(divisor, len(shape)) != expect:
        return None
    rm = buffer_of(g, rm_view, channels, dtype)
    scale = eps_root(g, divisor, channels, dtype, inverse=inverse)
    if rm is None or scale is None:
        return None
    rv, eps = scale
    tail = affine_tail(g, node, dtype, expect, (channels,), bias=True, buffer=True)
    if tail is None:
        return None
    output, weight, bias, tail_nodes = tail
    spec = handwritten_spec(
        g, output, kind, len(shape), channels=channels, eps=eps, batch_stats=False
    )
    slots = Slots(x, weight, bias, running_mean=rm, running_var=rv)
    return Match(output, [node, sub, *tail_nodes], spec, slots, casts)


def recognize_running(g: Graph) -> None:
    """Replace every hand-written running-statistics BatchNorm with a placeholder."""
    apply_rule(g, match_running)
