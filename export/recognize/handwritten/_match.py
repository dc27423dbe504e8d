"""What the hand-written rules share beyond spellings: the axes a reduction says, the
per-channel operands, the affine tail, and the one way a match is rewritten."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from normport.export._placeholder import TENSOR_NAMES, LayerSpec
from normport.export.recognize._graph import Graph, Slots, is_op
from normport.export.recognize.handwritten._spellings import (
    ASSERT,
    CASTS,
    SHAPES,
    aten,
    commuted,
    compute_dtype,
    erased,
    float_val,
    same_shape,
    users,
)

__all__ = [
    "apply_rule",
    "handwritten_spec",
    "Match",
    "Reshaped",
    "affine_tail",
    "broadcast_shape",
    "constant_only",
    "finish_match",
    "layout",
    "per_channel",
    "rewrite",
]


def layout(shape: Sequence, dims: tuple[int, ...]) -> tuple[str, tuple, tuple, dict] | None:
    """What a reduction over ``dims`` of an input of ``shape`` normalizes, from the dims alone.

    Returns ``(kind, expect, target, fields)``: the kind, how a per-channel operand broadcasts
    against x, the shape of its slot, and the spec fields that say the axes.  ``None`` for any
    other set of axes, or one whose size is not known at export time.
    """
    rank = len(shape)
    k = len(dims)
    if dims == tuple(range(rank - k, rank)):  # the trailing k axes: (N, *, D1 .. Dk)
        norm = tuple(shape[rank - k :])
        if not all(isinstance(s, int) for s in norm):
            return None
        fields = {
            "channels": math.prod(norm),
            "normalized_ndim": k,
            "normalized_shape": norm,
        }
        return "layernorm", (1,) * (rank - k) + norm, norm, fields
    if rank >= 2 and dims == (0, *range(2, rank)) and isinstance(shape[1], int):  # (N, C, *S)
        c = shape[1]
        return "batchnorm", (1, c) + (1,) * (rank - 2), (c,), {"channels": c}
    if rank == 3 and dims == (0, 1) and isinstance(shape[2], int):  # channel-last (N, L, C)
        c = shape[2]
        return "sequence_batchnorm", (1, 1, c), (c,), {"channels": c}
    return None


def broadcast_shape(node: fx.Node, rank: int) -> tuple | None:
    """``node``'s shape left-padded with ones to ``rank`` (how it broadcasts against x)."""
    shape = tuple(Graph.val(node).shape)
    return (1,) * (rank - len(shape)) + shape if len(shape) <= rank else None


def constant_only(g: Graph, node: fx.Node, seen: set | None = None) -> bool:
    """Computed from parameters, buffers and constants only (never from an input)."""
    seen = set() if seen is None else seen
    if node in seen:
        return True
    seen.add(node)
    if node.op == "placeholder":
        return g.constant(node)
    return all(constant_only(g, n, seen) for n in node.all_input_nodes)


@dataclass(frozen=True)
class Reshaped:
    """A slot made by reshaping ``node`` to ``shape``: inserted only once the match holds."""

    node: fx.Node
    shape: tuple[int, ...]


def per_channel(
    g: Graph,
    node,
    expect: tuple[int, ...],
    target: tuple[int, ...],
    dtype: torch.dtype,
    *,
    buffer: bool = False,
) -> fx.Node | Reshaped | None:
    """An affine or running-statistics operand as the placeholder takes it, or None.

    ``node`` must be computed from parameters and buffers only, have the activation ``dtype``
    and broadcast against x as ``expect`` (``(1, C, 1, 1)``, ``(1, 1, D)``, ...).  Returns the
    node of exactly ``target`` shape (``(C,)``, the normalized shape) under its views, else a
    :class:`Reshaped`.  ``buffer``: it must be a parameter or buffer itself (lowerings fold
    running statistics at export time, from the initializer).
    """
    if not isinstance(node, fx.Node) or (val := float_val(node)) is None or val.dtype != dtype:
        return None
    if broadcast_shape(node, len(expect)) != expect or not constant_only(g, node):
        return None
    current = node
    while True:
        if tuple(Graph.val(current).shape) == target and (g.constant(current) or not buffer):
            return current
        if not is_op(current, *SHAPES):
            return None if buffer else Reshaped(node, target)
        current = current.args[0]


def affine_tail(
    g: Graph,
    core: fx.Node,
    dtype: torch.dtype,
    expect: tuple[int, ...],
    target: tuple[int, ...],
    *,
    bias: bool,
    buffer: bool = False,
) -> tuple[fx.Node, fx.Node | Reshaped | None, fx.Node | Reshaped | None, list[fx.Node]] | None:
    """Grow a match forward from the normalized value ``core``: ``* weight``, then ``+ bias``
    (with ``bias``), and casts in between, as long as each node is the only user of the last
    and comes from the same module (a separate scale-and-shift module keeps its own path).
    ``buffer``: weight and bias must be parameters or buffers (see :func:`per_channel`).

    Returns ``(output, weight, bias, nodes)`` for the longest such tail whose output has the
    input's ``dtype`` (the placeholder's output has it), or None when there is none.
    """
    allowed = (dtype, compute_dtype(dtype))
    current, w, b, nodes = core, None, None, []
    best = (core, None, None, []) if Graph.val(core).dtype == dtype else None
    while len(following := users(current)) == 1:
        nxt = following[0]
        if Graph.owner(nxt) != Graph.owner(core):
            break
        if is_op(nxt, *CASTS) and nxt.args[0] is current:
            if Graph.val(nxt).dtype not in allowed:
                break
        elif is_op(nxt, aten.mul) and w is None and b is None:
            other = [o for a, o in commuted(nxt) if a is current]
            w = per_channel(g, other[0], expect, target, dtype, buffer=buffer) if other else None
            if w is None:
                break
        elif bias and is_op(nxt, aten.add) and b is None:
            other = [o for a, o in commuted(nxt) if a is current]
            b = per_channel(g, other[0], expect, target, dtype, buffer=buffer) if other else None
            if b is None:
                break
        else:
            break
        nodes.append(nxt)
        current = nxt
        if Graph.val(current).dtype == dtype:
            best = (current, w, b, list(nodes))
    return best


@dataclass
class Match:
    """What a rule found: the output to reroute, the nodes that must be private to the match
    (the statistics and the normalized value), the casts of x and the placeholder's inputs."""

    output: fx.Node
    private: list[fx.Node]
    spec: LayerSpec
    slots: Slots
    casts: list[fx.Node] = field(default_factory=list)

    def valid(self) -> bool:
        """A ``mean`` or ``var`` that other code also reads must not be swallowed."""
        inside = set(self.private) | {self.output}
        x, out = Graph.val(self.slots.x), Graph.val(self.output)
        if not same_shape(x.shape, out.shape) or x.dtype != out.dtype:
            return False  # e.g. a (N, 1, H, W) input broadcast against (1, C, 1, 1)
        return all(set(users(n)) <= inside for n in self.private if n is not self.output)


def rewrite(g: Graph, match: Match) -> fx.Node:
    """Insert the reshapes the slots need, drop the dtype checks export hung on the matched
    nodes (they would keep the dead subgraph alive), and route the output through one
    placeholder."""
    for name in TENSOR_NAMES:
        slot = getattr(match.slots, name)
        if isinstance(slot, Reshaped):
            with g.fx.inserting_before(match.output):
                node = g.fx.call_function(aten.reshape.default, (slot.node, list(slot.shape)))
            node.meta["val"] = Graph.val(slot.node).reshape(slot.shape)
            setattr(match.slots, name, node)
    for node in {*match.private, *match.casts, match.output}:
        for user in list(node.users):
            if is_op(user, ASSERT):
                g.fx.erase_node(user)
    return g.replace(match.output, match.spec, match.slots)


def apply_rule(g: Graph, match_at) -> None:
    """Run one rule: ``match_at(g, node)`` on every live node, rewriting each valid match."""
    for node in g.nodes():
        if erased(node):
            continue
        match = match_at(g, node)
        if match is not None and match.valid():
            rewrite(g, match)


def handwritten_spec(g: Graph, output: fx.Node, kind: str, rank: int, **fields: Any) -> LayerSpec:
    """The spec of a hand-written normalization of a rank-``rank`` input, owned by ``output``'s
    module; ``fields``: the rest of the :class:`LayerSpec` (channels, eps, ...)."""
    path, cls = g.owner(output)
    return LayerSpec(kind=kind, path=path, cls=cls, rank=rank, source="handwritten", **fields)


def finish_match(
    g: Graph,
    node: fx.Node,
    x: fx.Node,
    axes: tuple[str, tuple, tuple, dict],
    private: list[fx.Node],
    casts: list[fx.Node],
    *,
    kind: str,
    bias: bool,
    **fields: Any,
) -> Match | None:
    """The match of a batch-statistics normalization of ``x`` whose normalized value is ``node``:
    its :func:`affine_tail` (a bias too with ``bias``) over the :func:`layout` ``axes``, or None
    when there is none.  ``private``: the statistics' nodes; ``fields``: the spec's beyond the
    axes (eps, ...)."""
    _, expect, target, axis_fields = axes
    tail = affine_tail(g, node, Graph.val(x).dtype, expect, target, bias=bias)
    if tail is None:
        return None
    output, weight, b, tail_nodes = tail
    rank = len(Graph.val(x).shape)
    spec = handwritten_spec(g, output, kind, rank, **axis_fields, **fields)
    return Match(output, [*private, *tail_nodes], spec, Slots(x, weight, b), casts)
