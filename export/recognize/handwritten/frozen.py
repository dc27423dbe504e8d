"""An eval BatchNorm folded by hand: torchvision's ``FrozenBatchNorm2d``.

.. math::

    s_c = \\frac{w_c}{\\sqrt{\\hat\\sigma^2_c + \\epsilon}}, \\qquad
    y = x \\cdot s_c + (b_c - \\hat\\mu_c s_c)

which is BatchNorm with running statistics, whatever the module's training flag.  The matched
subgraph (torchvision reshapes the four ``(C,)`` buffers first; views may sit anywhere on the
buffer side)::

    w ─► view ───────────────────────────────► mul ─► scale ─┐
    rv ─► view ─► + eps ─► rsqrt ──────────────┘      │       │
    x ───────────────────────────────────────────────┼──────► mul ─┐
    b ─► view ─► sub ◄── mul ◄─ rm.view               │            add ─► y
                  │       └────────── scale ◄─────────┘            │
                  └────────────────────────────────────────────────┘

``kind="batchnorm"`` for ``(N, C, *S)`` (the scale broadcasting as ``(1, C, 1, ...)``),
``"sequence_batchnorm"`` for channel-last ``(N, L, C)``; ``batch_stats=False``, the four
buffers in the placeholder's slots.  Also ``scale * x``, ``bias + x * scale``,
``scale * rm``, ``(rv + eps).rsqrt() * w``, and no weight (``scale = rsqrt(rv + eps)``).

Not matched: a shift that is not ``b - rm * scale`` with the same scale (a plain affine
``x * s + t`` is no normalization), buffers of another dtype than x.
"""

from __future__ import annotations

from torch import fx

from normport.export.recognize._graph import Graph, Slots, is_op
from normport.export.recognize.handwritten._match import (
    Match,
    apply_rule,
    broadcast_shape,
    constant_only,
    handwritten_spec,
)
from normport.export.recognize.handwritten._spellings import (
    aten,
    casts_ok,
    centered,
    commuted,
    same_value,
    strip_casts,
    strip_shapes,
)
from normport.export.recognize.handwritten.running import buffer_of, channel_layout, eps_root

__all__ = ["recognize_frozen"]


def _scale(g: Graph, scale: fx.Node, channels: int, dtype):
    """``w * rsqrt(rv + eps)`` (either order) or ``rsqrt(rv + eps)`` -> ``(w, rv, eps)``."""
    inner = strip_shapes(scale)[0]
    if g.val(inner).numel() != channels:
        return None
    if (found := eps_root(g, inner, channels, dtype, inverse=True)) is not None:
        return None, *found
    if is_op(inner, aten.mul):
        for w_view, inv in commuted(inner):
            w = buffer_of(g, w_view, channels, dtype)
            found = eps_root(g, inv, channels, dtype, inverse=True)
            if w is not None and found is not None:
                return w, *found
    return None


def _shift(g: Graph, shift: fx.Node, scale: fx.Node, channels: int, dtype):
    """``b - rm * scale`` (either product order) -> ``(b, rm)``."""
    inner = strip_shapes(shift)[0]
    if (c := centered(inner)) is None or g.val(inner).numel() != channels:
        return None
    b_view, product, _ = c
    b = buffer_of(g, b_view, channels, dtype)
    if b is None or not isinstance(product, fx.Node) or not is_op(product, aten.mul):
        return None
    for rm_view, scale_again in commuted(product):
        if same_value(scale_again, scale) or same_value(strip_shapes(scale_again)[0], scale):
            rm = buffer_of(g, rm_view, channels, dtype)
            if rm is not None and g.val(product).numel() == channels:
                return b, rm
    return None


def _match(g: Graph, add: fx.Node, scaled: fx.Node, x_raw, scale, shift) -> Match | None:
    if not isinstance(x_raw, fx.Node) or not isinstance(scale, fx.Node):
        return None
    x, casts = strip_casts(x_raw)
    if constant_only(g, x) or not casts_ok(x, casts) or not isinstance(shift, fx.Node):
        return None
    shape, dtype = g.val(x).shape, g.val(x).dtype
    if (found := channel_layout(shape, scale)) is None:
        return None
    kind, expect, channels = found
    if broadcast_shape(shift, len(shape)) != expect or not constant_only(g, scale):
        return None
    scale_parts = _scale(g, scale, channels, dtype)
    shift_parts = _shift(g, shift, strip_shapes(scale)[0], channels, dtype)
    if scale_parts is None or shift_parts is None:
        return None
    w, rv, eps = scale_parts
    b, rm = shift_parts
    spec = handwritten_spec(g, add, kind, len(shape), channels=channels, eps=eps, batch_stats=False)
    slots = Slots(x, w, b, running_mean=rm, running_var=rv)
    return Match(add, [scaled], spec, slots, casts)


def match_frozen(g: Graph, node: fx.Node) -> Match | None:
    """The folded BatchNorm ``x * scale + shift`` whose output is ``node``, or None."""
    if not is_op(node, aten.add):
        return None
    for scaled, shift in commuted(node):
        if isinstance(scaled, fx.Node) and is_op(scaled, aten.mul):
            for x_raw, scale in commuted(scaled):
                if (match := _match(g, node, scaled, x_raw, scale, shift)) is not None:
                    return match
    return None


def recognize_frozen(g: Graph) -> None:
    """Replace every hand-folded eval BatchNorm of ``g`` with a placeholder."""
    apply_rule(g, match_frozen)
