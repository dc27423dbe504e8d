"""normport's ONNX functions, written with onnxscript's IR builder.

A lowering defines a function body as a Python function of a :class:`Body` and the function's
inputs, e.g. the core of every normalization here,

.. math::

    y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\cdot \\gamma + \\beta

reads ``f.Add(f.Mul(f.Div(d, f.Sqrt(f.Add(var, eps))), scale), bias)``: every ONNX op is an
attribute of the :class:`Body` (onnxscript's ``OpBuilder``), and the few forms that depend on
the model are methods here, each decided in one place:

- the opset: a reduction receives its ``axes`` as an attribute below opset 18 and as an input
  from 18 on (:meth:`Body.reduce_mean`); every other op the functions use has the same form
  at opsets 13-28.
- the activation dtype: statistics are computed in float32 for half types, float64 stays
  float64 (:meth:`Body.compute`, :meth:`Body.output`, :meth:`Body.scalar`).

:func:`define` traces the body once and returns the ``FunctionProto``.  Function attributes
have no defaults (``onnx.inliner`` drops them), so every call passes each one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript

from normport.export._emit import FUNCTION_DOMAIN, Emitter

__all__ = ["Body", "define"]

# ``axes`` of a reduction: literal axes, or the name of an ints attribute of the function.
Axes = Sequence[int] | str

# Since opset 18 ReduceMean takes ``axes`` as an input (before: an attribute).
_REDUCE_AXES_INPUT_OPSET = 18


@dataclass(frozen=True)
class Body:
    """The op builder of one function body: ``f.Sub(a, b)`` adds a ``Sub`` node."""

    op: onnxscript.OpBuilder
    opset: int
    elem_type: ir.DataType  # the activations' dtype
    compute_type: ir.DataType  # the statistics' dtype

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        return getattr(self.op, op_type)

    def compute(self, x: ir.Value) -> ir.Value:
        """``x`` in the compute dtype."""
        return x if self.elem_type == self.compute_type else self.op.Cast(x, to=self.compute_type)

    def output(self, y: ir.Value) -> ir.Value:
        """A compute-typed result back in the activations' dtype."""
        return y if self.elem_type == self.compute_type else self.op.Cast(y, to=self.elem_type)

    def scalar(self, value: float) -> ir.Value:
        """A compute-typed scalar constant."""
        return self.op.Constant(value=ir.tensor(np.array(value, self.compute_type.numpy())))

    def int64(self, value: int) -> ir.Value:
        return self.op.Constant(value=ir.tensor(np.array(value, np.int64)))

    def filled(self, shape: ir.Value, value: float) -> ir.Value:
        """A compute-typed tensor of ``shape`` (a 1-D int64 value) filled with ``value``."""
        fill = ir.tensor(np.array([value], self.compute_type.numpy()))
        return self.op.ConstantOfShape(shape, value=fill)

    def float_attr(self, name: str) -> ir.Value:
        """The function's float attribute ``name`` as a compute-typed scalar."""
        ref = ir.RefAttr("value_float", name, ir.AttributeType.FLOAT)
        value = self.op.Constant(value_float=ref)
        if self.compute_type == ir.DataType.FLOAT:
            return value
        return self.op.Cast(value, to=self.compute_type)

    def ints(self, values: Axes) -> ir.Value:
        """A 1-D int64 constant: literal ``values``, or the ints attribute named ``values``."""
        if isinstance(values, str):
            return self.op.Constant(value_ints=_ints_ref("value_ints", values))
        return self.op.Constant(value_ints=list(values))

    def reduce_mean(self, x: ir.Value, axes: Axes) -> ir.Value:
        """``ReduceMean(x, axes, keepdims=1)``, in the form of the body's opset."""
        if self.opset >= _REDUCE_AXES_INPUT_OPSET:
            return self.op.ReduceMean(x, self.ints(axes), keepdims=1)
        attr = _ints_ref("axes", axes) if isinstance(axes, str) else list(axes)
        return self.op.ReduceMean(x, axes=attr, keepdims=1)

    def moments(self, x: ir.Value, axes: Axes) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``(mean, d, var)``: :math:`\\mu`, :math:`d = x - \\mu` and the biased
        :math:`\\sigma^2 = \\overline{d^2}` over ``axes`` (kept as size-1 axes)."""
        mean = self.reduce_mean(x, axes)
        d = self.op.Sub(x, mean)
        return mean, d, self.reduce_mean(self.op.Mul(d, d), axes)

    def standardize(self, d: ir.Value, var: ir.Value) -> ir.Value:
        """:math:`d / \\sqrt{\\sigma^2 + \\epsilon}`, ``epsilon`` the function's attribute."""
        return self.op.Div(d, self.op.Sqrt(self.op.Add(var, self.float_attr("epsilon"))))

    def channel_affine(self, xn: ir.Value, scale: ir.Value, bias: ir.Value) -> ir.Value:
        """``xn * scale + bias`` with the per-channel ``scale`` and ``bias`` reshaped to the
        function's ``channel_shape`` attribute (``[C, 1, 1]`` for ``(N, C, H, W)``)."""
        shape = self.ints("channel_shape")
        s = self.op.Reshape(self.compute(scale), shape)
        t = self.op.Reshape(self.compute(bias), shape)
        return self.op.Add(self.op.Mul(xn, s), t)


def _ints_ref(attr: str, function_attr: str) -> ir.RefAttr:
    return ir.RefAttr(attr, function_attr, ir.AttributeType.INTS)


def define(
    em: Emitter,
    name: str,
    body: Callable[..., ir.Value | Sequence[ir.Value]],
    *,
    attributes: Sequence[str],
    inputs: Sequence[str] = ("X", "Scale", "B"),
    outputs: Sequence[str] = ("Y",),
) -> onnx.FunctionProto:
    """The function ``normport.<name>`` at ``em``'s opset and activation dtype:
    ``body(f, *inputs)`` returns its ``outputs``.

    A name with its signature stands for one body (one name, one body per model is what
    :meth:`Emitter.call` checks and what the train-graph contract reads): a function ``em``
    already holds is not traced again.
    """
    held = em.functions.get(name)
    if held is not None and _signature(held) == (list(inputs), list(outputs), list(attributes)):
        return held
    types = (ir.DataType(em.elem_type), ir.DataType(em.compute_type))

    def trace(op: onnxscript.OpBuilder, *values: ir.Value) -> list[ir.Value]:
        results = body(Body(op, em.opset, *types), *values)
        results = [results] if isinstance(results, ir.Value) else list(results)
        if len(results) != len(outputs):
            raise RuntimeError(f"{name}: body returned {len(results)} values for {outputs}")
        for i, out in enumerate(outputs):
            if results[i].producer() is None:  # a function input passed through
                results[i] = op.Identity(results[i])
            results[i].name = out
        return results

    function = onnxscript.build_function(
        trace,
        [ir.Value(name=n) for n in inputs],
        domain=FUNCTION_DOMAIN,
        name=name,
        attributes=[ir.Attr(a, ir.AttributeType.UNDEFINED, None) for a in attributes],
        opset_imports={"": em.opset},
    )
    return ir.serde.serialize_function(function)


def _signature(function: onnx.FunctionProto) -> tuple[list[str], list[str], list[str]]:
    return list(function.input), list(function.output), list(function.attribute)
