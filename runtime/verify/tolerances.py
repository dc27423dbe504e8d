"""Parity tolerances: one table, per dtype and scope.

A compared value passes when ``|actual - expected| <= atol + rtol * |expected|`` element-wise
(``numpy.isclose``); integers (``num_batches_tracked``) must be equal.  What ``expected`` is:

- float32 rows: PyTorch in float32 on the same input.
- float16 rows: PyTorch in **float64** on the half-rounded input, with the half-rounded
  parameters and statistics the float16 graph holds; the graph itself computes statistics in
  float32 and rounds its outputs to float16.

Why these numbers:

- float32 layers: a normalization is a handful of float32 operations per element; 1e-5 is
  about 100 float32 ulps at the magnitudes involved (|y| up to ~10).
- float32 networks: a dozen convolutions / matmuls accumulate differently in onnxruntime and
  PyTorch (summation order, fused kernels); 1e-4.
- float16 layers: the output is rounded to float16, a relative error up to 2**-11 = 4.9e-4,
  and the running statistics fed back step after step are float16 too.  onnxruntime stays
  within one or two half-ulps; onnx's ReferenceEvaluator computes InstanceNormalization in
  float16 throughout (seen: 3 half-ulps, 5.8e-3 at |y| = 3.8), hence 4e-3 (eight half-ulps
  below |y| = 1, a few above), as the normport-vs-torch.nn float16 tests use.
- float16 networks: every convolution, matmul and activation between the norms rounds to
  float16, so errors compound layer after layer (seen: up to 4.5e-3 on ``style_in``); 1e-2.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TOLERANCES", "Tolerance", "tolerance"]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float32", "layer"): Tolerance(atol=1e-5, rtol=1e-5),
    ("float32", "network"): Tolerance(atol=1e-4, rtol=1e-4),
    ("float16", "layer"): Tolerance(atol=4e-3, rtol=4e-3),
    ("float16", "network"): Tolerance(atol=1e-2, rtol=1e-2),
}


def tolerance(dtype: str, scope: str) -> Tolerance:
    try:
        return TOLERANCES[(dtype, scope)]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype!r} and scope {scope!r}") from None
