"""normport runtime: onnxruntime sessions, the inference service, and train-vs-inference
verification.

- ``python -m runtime serve``: the Open Inference Protocol service (:mod:`runtime.serve`).
- ``python -m runtime verify``: the parity matrix and divergence study (:mod:`runtime.verify`).
- ``python -m runtime recalibrate`` / :func:`runtime.recalibrate`: running statistics
  recalibrated on onnxruntime (:mod:`runtime.recalibration`).
"""

from __future__ import annotations

__all__ = ["recalibrate"]


def __getattr__(name: str):
    # Lazy: importing `runtime` must not pull in the web stack or matplotlib.
    if name == "recalibrate":
        from normport.runtime.recalibration import recalibrate

        return recalibrate
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
