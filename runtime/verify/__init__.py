"""Train-vs-inference verification: ``python -m runtime verify`` and ``make verify``.

The folder is the architecture:

- :mod:`~runtime.verify.subjects`: what is verified (standalone layers, zoo networks, a user's
  ``pkg.mod:factory``, with its contract).
- :mod:`~runtime.verify.parity`: the parity matrix, PyTorch vs onnxruntime vs onnx's reference
  evaluator, eval / train over fed-back steps / recalibration, float32 and float16;
  :mod:`~runtime.verify.tolerances` holds the one tolerance table.
- :mod:`~runtime.verify.divergence`: how train-mode and eval-mode outputs differ, measured.
- :mod:`~runtime.verify.reading`, :mod:`~runtime.verify.report`, :mod:`~runtime.verify.plots`:
  the plain-language reading, ``report.md`` / ``results.json``, the figures.
- :mod:`~runtime.verify._reference`: the ReferenceEvaluator and its BatchNormalization-9 fix.
- :mod:`~runtime.verify.cli`: ``main(argv) -> int`` and :func:`~runtime.verify.cli.run`.
"""

from __future__ import annotations

__all__ = ["main", "run"]


def __getattr__(name: str):
    # Lazy: `import runtime.verify` must not pull in torch, onnxruntime or matplotlib.
    if name in __all__:
        from runtime.verify import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'runtime.verify' has no attribute {name!r}")
