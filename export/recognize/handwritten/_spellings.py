"""The ATen spellings of one idea, for the hand-written rules: each helper recognises one
piece of math however the training IR writes it.

A hand-written norm reaches the training IR in many spellings of the same math: ``x.pow(2)``,
``x * x`` or ``torch.square(x)``; ``rsqrt(v)``, ``1 / sqrt(v)`` (``reciprocal`` then ``* 1``)
or ``v ** -0.5``; ``mean(keepdim=True)`` or ``mean(...).unsqueeze(-1)``; ``var(unbiased=False)``,
``var(correction=0)`` or ``var_mean``; ``x.to(float32)`` around any of them.  torch.export does
no common-subexpression elimination, so ``(x - m) * (x - m)`` is two ``sub`` nodes: values are
compared by structure (:func:`same_value`), not identity.  Every helper returns ``None`` when
the node is not the expected form, never raises.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from normport.export.recognize._graph import Graph, is_op

__all__ = [
    "ASSERT",
    "CASTS",
    "SHAPES",
    "Stat",
    "aten",
    "casts_ok",
    "centered",
    "commuted",
    "compute_dtype",
    "erased",
    "float_val",
    "inverse_root",
    "normalized",
    "quotient",
    "reciprocal",
    "root",
    "same_shape",
    "same_value",
    "scalar",
    "square_of",
    "statistic",
    "strip_casts",
    "strip_shapes",
    "users",
    "with_eps",
]

aten = torch.ops.aten

CASTS = (aten.to, aten._to_copy, aten.type_as)
SHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze)
ASSERT = aten._assert_tensor_metadata  # export hangs dtype checks on casts


def erased(node: fx.Node) -> bool:
    return getattr(node, "_erased", False)


def users(node: fx.Node) -> list[fx.Node]:
    """``node``'s users but the ``_assert_tensor_metadata`` checks export adds after casts."""
    return [u for u in node.users if not is_op(u, ASSERT)]


def float_val(node) -> torch.Tensor | None:
    """The fake floating-point tensor ``node`` made while tracing, else None."""
    val = Graph.val(node) if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) and val.is_floating_point() else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the lowerings compute statistics: float64 for float64, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def strip_casts(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The value under a chain of float casts, and the casts (outermost first)."""
    casts = []
    while isinstance(node, fx.Node) and is_op(node, *CASTS) and float_val(node) is not None:
        casts.append(node)
        node = node.args[0]
    return node, casts


def casts_ok(root: fx.Node, casts: Iterable[fx.Node]) -> bool:
    """Only widening to the lowering's compute dtype (or no-op casts): a cast to a narrower
    type in the middle of the statistics would round where the exported node does not."""
    dtype = Graph.val(root).dtype
    return all(Graph.val(c).dtype in (dtype, compute_dtype(dtype)) for c in casts)


def strip_shapes(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The value under a chain of view / reshape / (un)squeeze, and those nodes."""
    chain = []
    while isinstance(node, fx.Node) and is_op(node, *SHAPES):
        chain.append(node)
        node = node.args[0]
    return node, chain


def same_value(a, b) -> bool:
    """Whether ``a`` and ``b`` compute the same value: the same node, or the same op applied to
    arguments that are the same values (``x - m`` written twice)."""
    if a is b:
        return True
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return (
            a.op == b.op == "call_function"
            and a.target == b.target
            and same_value(a.args, b.args)
            and same_value(a.kwargs, b.kwargs)
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def same_shape(a: Sequence, b: Sequence) -> bool:
    """Equal dims, symbolic ones (a dynamic batch) included, without adding a guard."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


_COPIES = (aten.lift_fresh_copy, aten.detach, aten.detach_, aten.clone, *CASTS)


def scalar(g: Graph, value) -> float | None:
    """A Python number, or a one-element constant tensor: a parameter, buffer or a tensor made
    in ``forward`` (``torch.tensor(1e-5)``, lifted by export and copied before use)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    while isinstance(value, fx.Node) and is_op(value, *_COPIES):
        value = value.args[0]
    if not isinstance(value, fx.Node) or not g.constant(value):
        return None
    sig = g.program.graph_signature
    name = (
        sig.inputs_to_parameters.get(value.name)
        or sig.inputs_to_buffers.get(value.name)
        or sig.inputs_to_lifted_tensor_constants.get(value.name)
    )
    tensor = g.program.state_dict.get(name, g.program.constants.get(name))
    return float(tensor) if isinstance(tensor, torch.Tensor) and tensor.numel() == 1 else None


def commuted(node: fx.Node) -> list[tuple]:
    """``[(a, b), (b, a)]`` for a binary ``mul`` / ``add`` (alpha = 1)."""
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return []
    a, b = node.args
    return [(a, b), (b, a)]


def with_eps(g: Graph, node) -> tuple[fx.Node, float, fx.Node] | None:
    """``v + eps`` (either order; eps a Python number or a one-element constant) ->
    ``(v, eps, add node)``."""
    if not isinstance(node, fx.Node) or not is_op(node, aten.add):
        return None
    for v, eps in commuted(node):
        value = scalar(g, eps)
        if isinstance(v, fx.Node) and value is not None:
            return v, value, node
    return None


def _pow(node, exponent: float) -> fx.Node | None:
    if isinstance(node, fx.Node) and is_op(node, aten.pow.Tensor_Scalar):
        base, e = node.args
        return base if float(e) == exponent else None
    return None


def root(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``sqrt(v)`` or ``v ** 0.5`` -> ``(v, nodes)``."""
    if isinstance(node, fx.Node) and is_op(node, aten.sqrt):
        return node.args[0], [node]
    base = _pow(node, 0.5)
    return (base, [node]) if base is not None else None


def reciprocal(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``1 / v`` (``reciprocal(v)``, possibly ``* 1`` as Python's ``1 / t`` traces) or
    ``v ** -1`` -> ``(v, nodes)``."""
    if isinstance(node, fx.Node) and is_op(node, aten.mul):
        for a, one in commuted(node):
            if isinstance(one, (int, float)) and one == 1 and (inner := reciprocal(a)):
                return inner[0], [node, *inner[1]]
        return None
    if isinstance(node, fx.Node) and is_op(node, aten.reciprocal):
        return node.args[0], [node]
    base = _pow(node, -1.0)
    return (base, [node]) if base is not None else None


def inverse_root(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``rsqrt(v)``, ``1 / sqrt(v)`` or ``v ** -0.5`` -> ``(v, nodes)``."""
    if isinstance(node, fx.Node) and is_op(node, aten.rsqrt):
        return node.args[0], [node]
    base = _pow(node, -0.5)
    if base is not None:
        return base, [node]
    inv = reciprocal(node)
    if inv is not None and (r := root(inv[0])) is not None:
        return r[0], inv[1] + r[1]
    return None


def quotient(node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``a / d`` or ``a * (1 / d)`` (either order) -> ``(a, d, nodes)``."""
    if not isinstance(node, fx.Node):
        return None
    if is_op(node, aten.div.Tensor) and not node.kwargs.get("rounding_mode"):
        return node.args[0], node.args[1], [node]
    if is_op(node, aten.mul):
        for a, inv in commuted(node):
            if (found := reciprocal(inv)) is not None:
                return a, found[0], [node, *found[1]]
    return None


def normalized(node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``a / sqrt(r)``, ``a * rsqrt(r)``, ``a * r ** -0.5`` ... -> ``(a, r, nodes)``."""
    q = quotient(node)
    if q is not None and (found := root(q[1])) is not None:
        return q[0], found[0], q[2] + found[1]
    if isinstance(node, fx.Node) and is_op(node, aten.mul):
        for a, inv in commuted(node):
            if (found := inverse_root(inv)) is not None:
                return a, found[0], [node, *found[1]]
    return None


def centered(node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``x - m`` -> ``(x, m, sub node)``."""
    if (
        isinstance(node, fx.Node)
        and is_op(node, aten.sub.Tensor)
        and len(node.args) == 2
        and node.kwargs.get("alpha", 1) == 1
    ):
        return node.args[0], node.args[1], node
    return None


def square_of(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``v ** 2``, ``v * v`` (the same value twice) or ``square(v)`` -> ``(v, nodes)``."""
    if not isinstance(node, fx.Node):
        return None
    base = _pow(node, 2.0)
    if base is not None:
        return base, [node]
    if is_op(node, aten.square):
        return node.args[0], [node]
    if is_op(node, aten.mul) and len(node.args) == 2 and same_value(*node.args):
        return node.args[0], [node]
    return None


@dataclass(frozen=True)
class Stat:
    """A reduction over ``dims`` (non-negative, sorted) that keeps them as size-1 axes."""

    op: str  # mean | var | std
    x: fx.Node
    dims: tuple[int, ...]
    nodes: list[fx.Node]


def _dims(dims, rank: int) -> tuple[int, ...]:
    dims = range(rank) if dims is None or dims == [] else dims
    return tuple(sorted({int(d) % rank for d in dims}))


def _biased(node: fx.Node) -> bool:
    if node.target.name().endswith(".dim"):  # var.dim(x, dims, unbiased=True, keepdim)
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        return unbiased is False
    return node.kwargs.get("correction", 1) == 0  # .correction: None means 1


def statistic(node, ops: Sequence[str]) -> Stat | None:
    """``mean`` / biased ``var`` / biased ``std`` over some dims, broadcastable against its
    input: ``keepdim=True``, or ``keepdim=False`` followed by a view / unsqueeze back to the
    keepdim shape (the same values in the same order)."""
    if not isinstance(node, fx.Node):
        return None
    outer, chain = strip_shapes(node)
    reduction, nodes = outer, [*chain]
    if is_op(outer, operator.getitem) and isinstance(outer.args[0], fx.Node):
        parent, index = outer.args
        pair = {aten.var_mean: ("var", "mean"), aten.std_mean: ("std", "mean")}
        for packet, names in pair.items():
            if is_op(parent, packet) and index in (0, 1):
                reduction, op = parent, names[index]
                nodes += [outer, parent]
                break
        else:
            return None
    elif is_op(outer, aten.mean.dim):
        reduction, op = outer, "mean"
        nodes.append(outer)
        if outer.kwargs.get("dtype") is not None or len(outer.args) > 3:
            return None
    elif is_op(outer, aten.var, aten.std):
        reduction, op = outer, outer.target.overloadpacket.__name__
        nodes.append(outer)
    else:
        return None
    if op not in ops or (op != "mean" and not _biased(reduction)):
        return None
    x = reduction.args[0]
    shape = Graph.val(x).shape
    dims = _dims(reduction.args[1] if len(reduction.args) > 1 else None, len(shape))
    keep = [1 if i in dims else s for i, s in enumerate(shape)]
    if not same_shape(Graph.val(node).shape, keep):
        return None
    return Stat(op, x, dims, nodes)
