"""The bounds a traced graph puts on its symbolic dims, kept in the ONNX model's metadata.

torch.export knows them in two places:

- ``ExportedProgram.range_constraints``: symbol -> value range; narrower than the ``Dim`` we
  pass (``[1, DIM_MAX]``) when export refined a dim from its own suggested fixes;
- the deferred runtime asserts: with ``prefer_deferred_runtime_asserts_over_guards`` a guard
  becomes an ``aten._assert_scalar`` node, e.g. ``Eq(s27, Min(64, s27))`` where a 64-row
  position table is sliced to the sequence length and added to it.

torch.onnx drops the asserts, so onnxruntime fails inside the graph instead (``Add``: "64 by
65").  :func:`dim_bounds` solves every assert on a single dim symbol for the integer range it
allows (sympy ``solveset``; a union is widened to its hull, a set sympy cannot solve, e.g.
``Eq(Mod(s, 2), 0)``, is no bound) and intersects it with the range constraint::

    Eq(s27, Min(64, s27)), s27 in [1, 65536]  ->  {"seq_len": {"max": 64}}

Only real bounds are kept: a ``max`` below ``DIM_MAX``, a ``min`` above 2 (torch.export
specialises sizes 0 and 1, so its own lower bound is 2, and size-oblivious tracing adds
``Ne(s, 1)`` asserts that the ONNX graph does not need: ``transformer_ln`` runs at
``seq_len = 1`` and matches PyTorch).  Asserts relating two symbols (``Eq(s0, s1)``) and dims
that are an expression of a symbol (``2 * s0``) give no per-dim bound.

The metadata format and its reader are :mod:`export._bounds_format` (torch-free).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import sympy
import torch
from torch.utils._sympy import functions as torch_sympy

from normport.export._bounds_format import Bounds

__all__ = ["DIM_MAX", "dim_bounds"]

DIM_MAX = 1 << 16  # the upper bound of every torch.export.Dim the tracer declares
_TRACER_MIN = 2  # lower bounds up to this are torch.export's, not the graph's


# torch's own sympy functions, which sympy's solvers do not know, as sympy's.
_AS_SYMPY = {
    torch_sympy.Min: sympy.Min,
    torch_sympy.Max: sympy.Max,
    torch_sympy.FloorDiv: lambda a, b: sympy.floor(a / b),
    torch_sympy.CeilDiv: lambda a, b: sympy.ceiling(a / b),
}


def dim_bounds(
    program: torch.export.ExportedProgram,
    input_names: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]],
) -> Bounds:
    """``{dim name: {"min": n, "max": n}}`` for the dims of ``dynamic`` the graph bounds."""
    names = _symbols(program, input_names, dynamic)
    ranges: dict[sympy.Symbol, tuple[float, float]] = {}
    for symbol in names:
        found = program.range_constraints.get(symbol)
        lo, hi = (1, DIM_MAX) if found is None else (found.lower, found.upper)
        ranges[symbol] = (_finite(lo, -math.inf), _finite(hi, math.inf))
    for expr in _asserts(program):
        free = expr.free_symbols
        if len(free) != 1 or (symbol := next(iter(free))) not in ranges:
            continue
        ranges[symbol] = _narrow(expr, symbol, *ranges[symbol])
    out: Bounds = {}
    for symbol, (lo, hi) in ranges.items():
        entry = {}
        if lo > _TRACER_MIN:
            entry["min"] = int(lo)
        if hi < DIM_MAX:
            entry["max"] = int(hi)
        if entry:
            out[names[symbol]] = entry
    return out


def _symbols(
    program: torch.export.ExportedProgram,
    input_names: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]],
) -> dict[sympy.Symbol, str]:
    """The tracer's symbol of each dynamic dim that is a plain symbol, and the caller's name."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = program.graph_signature.user_inputs
    names: dict[sympy.Symbol, str] = {}
    for input_name, node_name in zip(input_names, user_inputs, strict=False):
        shape = placeholders[node_name].meta["val"].shape
        for axis, dim_name in dynamic.get(input_name, {}).items():
            size = shape[axis % len(shape)]
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                names.setdefault(size.node.expr, dim_name)
    return names


def _asserts(program: torch.export.ExportedProgram) -> list[sympy.Basic]:
    exprs = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten._assert_scalar.default:
            continue
        cond = node.args[0]
        value = cond.meta.get("val") if isinstance(cond, torch.fx.Node) else None
        if isinstance(value, torch.SymBool):
            exprs.append(value.node.expr)
    return exprs


def _narrow(expr: sympy.Basic, symbol: sympy.Symbol, lo: float, hi: float) -> tuple[float, float]:
    """The integer hull of the values in ``[lo, hi]`` that satisfy ``expr``; unchanged when sympy
    cannot tell."""
    x = sympy.Symbol("x", real=True)
    domain = sympy.Interval(lo, hi)
    for torch_fn, sympy_fn in _AS_SYMPY.items():
        expr = expr.replace(torch_fn, sympy_fn)
    try:
        solved = sympy.solveset(expr.subs(symbol, x), x, domain=domain)
    except Exception:  # sympy raises assorted errors on torch's own functions (FloorDiv, ...)
        return lo, hi
    if isinstance(solved, sympy.ConditionSet):
        return lo, hi
    if solved.is_empty:  # no size passes: the trace itself would have failed
        return lo, hi
    new_lo, new_hi = _integer(solved.inf, up=True), _integer(solved.sup, up=False)
    if isinstance(solved, sympy.Interval):
        new_lo += 1 if solved.left_open and solved.inf.is_integer else 0
        new_hi -= 1 if solved.right_open and solved.sup.is_integer else 0
    return max(lo, new_lo), min(hi, new_hi)


def _integer(value: sympy.Expr, *, up: bool) -> float:
    if value.is_infinite:
        return -math.inf if value.is_negative else math.inf
    return int(sympy.ceiling(value) if up else sympy.floor(value))


def _finite(value: int | sympy.Expr, infinite: float) -> float:
    """A range end as a number: torch's ``int_oo`` (no ``sympy.Integer``, and claiming
    ``is_finite``) and sympy's ``oo`` become ``infinite``."""
    return int(value) if isinstance(value, int | sympy.Integer) else infinite
