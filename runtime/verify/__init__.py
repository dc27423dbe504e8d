"""Train-vs-inference verification: ``python -m runtime verify`` and ``make verify``.

The folder is the architecture:

- :mod:`~runtime.verify.subjects`: what is verified (standalone layers, zoo networks, a user's
  ``pkg.mod:factory``, with its contract).
- :mod:`~runtime.verify.parity`: the parity matrix, PyTorch vs onnxruntime vs onnx's reference
  evaluator, eval / train over fed-back steps / recalibration, float32 and float16;
  :mod:`~runtime.verify.tolerances` holds the one tolerance table.
- :mod:`~runtime.verify.matrix`: one subject's cells and facts: random layers off
  (:mod:`~runtime.verify.randomness`), exports, the crash-isolated first run of every graph
  (:mod:`~runtime.verify.isolate`), the cells, the batch-mates probe.
- :mod:`~runtime.verify.facts`: what was measured per subject (the report's only source) and
  the cell statuses; :mod:`~runtime.verify.verdict`: PASS / WARN / FAIL / ERROR per subject.
- :mod:`~runtime.verify.divergence`: how train-mode and eval-mode outputs differ, measured.
- :mod:`~runtime.verify.reading`, :mod:`~runtime.verify.report`, :mod:`~runtime.verify.tables`,
  :mod:`~runtime.verify.plots`, :mod:`~runtime.verify.plot_parity`: the plain-language
  reading, ``report.md`` / ``results.json``, its tables, the figures.
- :mod:`~runtime.verify._reference`: the ReferenceEvaluator and its BatchNormalization-9 fix.
- :mod:`~runtime.verify.cli`: ``main(argv) -> int`` and :func:`~runtime.verify.cli.run`.
"""

from __future__ import annotations

__all__ = ["main", "run"]


def __getattr__(name: str):
    # Lazy: `import runtime.verify` must not pull in torch, onnxruntime or matplotlib.
    if name in __all__:
        from normport.runtime.verify import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'runtime.verify' has no attribute {name!r}")
