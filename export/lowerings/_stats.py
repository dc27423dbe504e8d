"""The running-statistics update inside ONNX functions: PyTorch's convention, in one place.

.. math::

    \\hat\\mu \\leftarrow (1 - m)\\,\\hat\\mu + m\\,\\mu_B, \\qquad
    \\hat\\sigma^2 \\leftarrow (1 - m)\\,\\hat\\sigma^2 + m\\,\\sigma^2_B \\frac{n}{n - 1}

with ``m = momentum``, or ``m = 1 / (num_batches_tracked + 1)`` for the cumulative average
(``momentum=None``).  ONNX's own BatchNormalization(training_mode=1) uses ``1 - m`` and the
*biased* variance, which is why normport does not use it for training graphs.
"""

from __future__ import annotations

from normport.export._emit import Body

__all__ = ["STAT_INPUTS", "STAT_OUTPUTS", "count_per_channel", "running_update"]

STAT_INPUTS = ("running_mean", "running_var", "num_batches_tracked")
STAT_OUTPUTS = ("new_mean", "new_var", "new_count")


def count_per_channel(b: Body, x: str, per_channel_stat: str) -> str:
    """``n``: values per statistics channel, ``Size(x) / Size(stat)``, compute-typed."""
    size_x, size_s, n = b.tmp("size"), b.tmp("size"), b.tmp("n")
    b(f"{size_x} = Size ({x})")
    b(f"{size_s} = Size ({per_channel_stat})")
    fx, fs = b.tmp("size"), b.tmp("size")
    b(f"{fx} = Cast <to = {b.compute_type}> ({size_x})")
    b(f"{fs} = Cast <to = {b.compute_type}> ({size_s})")
    b(f"{n} = Div ({fx}, {fs})")
    return n


def running_update(
    b: Body, mean_c: str, var_c: str, n: str, *, momentum: str, counts: bool
) -> None:
    """Emit ``new_mean``, ``new_var``, ``new_count`` from per-channel ``(C,)`` batch stats.

    ``momentum``: ``"attr"`` (the function's float attribute), ``"cumulative"``
    (``1 / (num_batches_tracked + 1)``) or ``"zero"`` (InstanceNorm with momentum=None).
    ``counts``: whether ``num_batches_tracked`` advances (False for InstanceNorm).
    """
    one = b.scalar(1.0)
    if counts:
        step = b.tmp("step")
        b(f"{step} = Constant <value = int64 {{1}}> ()")
        b(f"new_count = Add (num_batches_tracked, {step})")
    else:
        b("new_count = Identity (num_batches_tracked)")
    if momentum == "attr":
        m = b.scalar_attr("momentum")
    elif momentum == "cumulative":
        counted, m = b.tmp("counted"), b.tmp("m")
        b(f"{counted} = Cast <to = {b.compute_type}> (new_count)")
        b(f"{m} = Div ({one}, {counted})")
    else:
        m = b.scalar(0.0)
    keep = b.tmp("keep")
    b(f"{keep} = Sub ({one}, {m})")
    # Unbiased variance for the running estimate: var * n / (n - 1).
    n1, unbiased, ratio = b.tmp("n1"), b.tmp("unbiased"), b.tmp("ratio")
    b(f"{n1} = Sub ({n}, {one})")
    b(f"{ratio} = Div ({n}, {n1})")
    b(f"{unbiased} = Mul ({var_c}, {ratio})")
    for old, new, stat in (
        ("running_mean", "new_mean", mean_c),
        ("running_var", "new_var", unbiased),
    ):
        oldc = b.to_compute(old)
        a, c, s = b.tmp("a"), b.tmp("c"), b.tmp("s")
        b(f"{a} = Mul ({oldc}, {keep})")
        b(f"{c} = Mul ({stat}, {m})")
        b(f"{s} = Add ({a}, {c})")
        b.to_output(s, new)


def momentum_mode(momentum: float | None, *, instance: bool = False) -> str:
    if momentum is not None:
        return "attr"
    return "zero" if instance else "cumulative"


def momentum_attr(momentum: float | None) -> dict[str, float]:
    return {"momentum": float(momentum)} if momentum is not None else {}
