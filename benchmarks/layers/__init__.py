"""Benchmark every normport layer against its torch.nn twin, side by side in one run.

Run as ``python -m benchmarks.layers --threads 1 --out reports/bench/layers.json`` (``make bench``).

For each layer case of :data:`benchmarks.cases.LAYERS` (a realistic shape) and each mode

* ``eval``: ``module.eval()``, forward under ``torch.no_grad()``;
* ``train``: ``module.train()``, forward + ``y.backward(grad)`` with a fixed random ``grad``
  (input and parameter gradients reset to None, untimed, before every repeat),

normport and its twin get the same random, non-trivial state (one state_dict loaded into both,
BatchNorm running statistics included) and the same input.  Their outputs and gradients are
compared first (``max_abs_diff``; a row whose diff is not below :data:`MAX_ABS_DIFF` is marked
``valid: false`` and still timed).  The timings are interleaved: every repeat round times both
modules, alternating which goes first, so machine noise hits both alike.  The warmup sizes the
schedule to a time budget per row: each sample averages ``inner`` consecutive steps, and the
median over ``repeats`` rounds is reported (with the interquartile range).
``ratio = normport_ms / twin_ms`` and ``ok`` means a valid row with ``ratio <= RATIO_TARGET``;
CPU rows also carry their mode's ``target`` (:data:`MODE_TARGETS`: eval <= 1.2, train <= 1.5)
and ``target_met``.

The twin is the layer's torch.nn twin from the layer table, built with the case's arguments
(:mod:`benchmarks.twins`).  SwitchableNorm2d has none; it is compared with
:class:`ReferenceSwitchableNorm2d`, the composite a user would write without normport (the
structure of the authors' reference implementation, in plain torch ops).

With CUDA available the same comparison also runs on the GPU, eager and under
``torch.compile`` (CUDA events around ``inner`` steps, gradient resets included), and the eval
forward of LayerNorm and BatchNorm2d is related to a device-to-device copy of the same tensor
(fraction of copy bandwidth).  A comparison that fails under ``torch.compile`` becomes a row
with an ``error`` instead of aborting the run.
Without CUDA the JSON records ``"cuda": null`` and ``"cuda_skipped"`` says why.

Modules:

* :mod:`benchmarks.cases` / :mod:`benchmarks.twins`: the layer cases, their state and twins
  (shared with :mod:`benchmarks.export`);
* :mod:`benchmarks.timing`: steps, interleaved timing, schedules, summaries (generic;
  :mod:`benchmarks.export` uses it too);
* :mod:`benchmarks.layers.compare`: both sides' state and inputs, the timed step, agreement;
* :mod:`benchmarks.layers.rows`: one checked and timed JSON row per layer and mode;
* :mod:`benchmarks.layers.report`: metadata, the text table, the JSON file;
* :mod:`benchmarks.layers.cli`: options, the CPU and GPU runs, ``main``.
"""

from benchmarks.layers.cli import main
from benchmarks.layers.compare import MAX_ABS_DIFF
from benchmarks.layers.rows import MODE_TARGETS, RATIO_TARGET
from benchmarks.twins import ReferenceSwitchableNorm2d

__all__ = ["MAX_ABS_DIFF", "MODE_TARGETS", "RATIO_TARGET", "ReferenceSwitchableNorm2d", "main"]
