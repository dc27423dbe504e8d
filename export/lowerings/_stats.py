"""The running-statistics update inside ONNX functions: PyTorch's convention, in one place.

.. math::

    \\hat\\mu \\leftarrow (1 - m)\\,\\hat\\mu + m\\,\\mu_B, \\qquad
    \\hat\\sigma^2 \\leftarrow (1 - m)\\,\\hat\\sigma^2 + m\\,\\sigma^2_B \\frac{n}{n - 1}

with ``m = momentum``, or ``m = 1 / (num_batches_tracked + 1)`` for the cumulative average
(``momentum=None``).  ONNX's own BatchNormalization(training_mode=1) uses ``1 - m`` and the
*biased* variance, which is why normport does not use it for training graphs.
"""

from __future__ import annotations

import onnx_ir as ir

from normport.export.lowerings._body import Body

__all__ = ["STAT_INPUTS", "STAT_OUTPUTS", "count_per_channel", "running_update"]

STAT_INPUTS = ("running_mean", "running_var", "num_batches_tracked")
STAT_OUTPUTS = ("new_mean", "new_var", "new_count")


def count_per_channel(f: Body, x: ir.Value, per_channel_stat: ir.Value) -> ir.Value:
    """``n``: values per statistics channel, ``Size(x) / Size(stat)``, compute-typed."""
    size_x = f.Cast(f.Size(x), to=f.compute_type)
    return f.Div(size_x, f.Cast(f.Size(per_channel_stat), to=f.compute_type))


def running_update(
    f: Body,
    mean_c: ir.Value,
    var_c: ir.Value,
    n: ir.Value,
    running: tuple[ir.Value, ir.Value, ir.Value],
    *,
    momentum: str,
    counts: bool,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``(new_mean, new_var, new_count)`` from per-channel ``(C,)`` batch statistics and the
    ``running`` ``(running_mean, running_var, num_batches_tracked)``.

    ``momentum``: ``"attr"`` (the function's float attribute), ``"cumulative"``
    (``1 / (num_batches_tracked + 1)``) or ``"zero"`` (InstanceNorm with momentum=None).
    ``counts``: whether ``num_batches_tracked`` advances (False for InstanceNorm).
    """
    running_mean, running_var, count = running
    one = f.scalar(1.0)
    new_count = f.Add(count, f.int64(1)) if counts else count
    if momentum == "attr":
        m = f.float_attr("momentum")
    elif momentum == "cumulative":
        m = f.Div(one, f.Cast(new_count, to=f.compute_type))
    else:
        m = f.scalar(0.0)
    keep = f.Sub(one, m)
    unbiased = f.Mul(var_c, f.Div(n, f.Sub(n, one)))  # var * n / (n - 1)
    new_mean, new_var = (
        f.output(f.Add(f.Mul(f.compute(old), keep), f.Mul(stat, m)))
        for old, stat in ((running_mean, mean_c), (running_var, unbiased))
    )
    return new_mean, new_var, new_count


def momentum_mode(momentum: float | None, *, instance: bool = False) -> str:
    if momentum is not None:
        return "attr"
    return "zero" if instance else "cumulative"


def momentum_attr(momentum: float | None) -> dict[str, float]:
    return {"momentum": float(momentum)} if momentum is not None else {}
