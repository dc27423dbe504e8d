"""The divergence study: how training-mode and inference-mode outputs differ, measured.

Everything runs in float64 PyTorch on the normport layers (which the parity matrix proves equal
to the exported graphs), so a difference of exactly 0 means "independent", not "small".

- **Batch size** (:func:`batch_curve`): train-mode output (batch statistics) minus eval-mode
  output (running statistics set to the data's own statistics) for batches of 1 to 256.
  Layers with batch statistics converge as the batch grows; per-sample layers are 0 at
  every size.
- **Batch-mates** (:func:`batch_mates`): sample 0 of a batch of 8, its 7 batch-mates replaced
  by fresh draws; the largest change of sample 0's output, in train and in eval mode.
- **Training steps** (:func:`steps_curve`, stateful layer types): from random running
  statistics and ``num_batches_tracked = 0``, train-mode steps on batches of 16; after k
  steps, how far the running mean and variance are from the data's (in data standard
  deviations / relative), and the mean eval-vs-train output gap on a held-out batch of 256;
  momentum 0.1 and None.

Networks get the batch-size curve and the batch-mates test; their "data statistics" are
estimated first by a cumulative average over 16 train-mode batches of 32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from normport.export.outputs import named_leaves
from normport.runtime.messages import first_line
from normport.runtime.verify.randomness import draws_random, train_mode
from normport.runtime.verify.subjects import Subject

__all__ = [
    "BATCH_SIZES",
    "STEPS",
    "BatchPoint",
    "Divergence",
    "StepsCurve",
    "agreeing_batch",
    "batch_curve",
    "batch_mates",
    "extrapolated_batch",
    "steps_curve",
    "study",
]

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NETWORK_BATCH_SIZES = (1, 4, 16, 64)
STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200)
MOMENTA = (0.1, None)
STEP_BATCH = 16
MATES = 8
HELD_OUT = 256
_PROBE_BATCH = (4, 0, False)  # (batch_size, seed, alt) for the randomness check
_SAMPLES_PER_POINT = 256  # batches per point: enough draws to average the noise out
_ZERO = 1e-12  # float64: below this relative change, the output did not change


@dataclass
class BatchPoint:
    batch_size: int
    mean_abs: float | None  # mean |train - eval|, None where training rejects the batch
    max_abs: float | None
    note: str = ""


@dataclass
class StepsCurve:
    momentum: float | None
    steps: list[int]
    mean_error: list[float]  # max over channels |running_mean - mean| / std
    var_error: list[float]  # max over channels |running_var / var - 1|
    output_gap: list[float]  # mean |eval - train| on a held-out batch of 256


@dataclass
class Divergence:
    """What one subject's study found."""

    subject: str
    kind: str
    family: str
    output_scale: float  # mean |eval output| on 256 samples: what the differences compare to
    batch_curve: list[BatchPoint]
    mates_train: float  # max |change| of sample 0's train-mode output
    mates_eval: float
    steps: list[StepsCurve] = field(default_factory=list)

    @property
    def depends_on_batch(self) -> bool:
        return self.mates_train > _ZERO * max(1.0, self.output_scale)

    def to_json(self) -> dict:
        return {**asdict(self), "depends_on_batch": self.depends_on_batch}


def agreeing_batch(d: Divergence, atol: float, rtol: float) -> int | None:
    """The smallest measured batch size from which train and eval agree within a tolerance.

    Agreement at a size: ``mean |train - eval| <= atol + rtol * output_scale`` there and at
    every larger measured size (the mean, as the batch-size curve plots it; the output scale
    stands in for ``|expected|``).  None when the largest measured size still disagrees or
    training rejects it.
    """
    found = None
    for point in reversed(d.batch_curve):
        if point.mean_abs is None or point.mean_abs > atol + rtol * d.output_scale:
            break
        found = point.batch_size
    return found


def extrapolated_batch(d: Divergence, atol: float, rtol: float) -> int | None:
    """Where the curve would reach the tolerance, extending its last measured log-log slope.

    An estimate for a curve still above the tolerance at its largest size (batch statistics
    usually fall as ``1 / sqrt(B)``); None when the curve does not fall there.
    """
    points = [p for p in d.batch_curve if p.mean_abs]
    if len(points) < 2:
        return None
    (b1, m1), (b2, m2) = [(p.batch_size, p.mean_abs) for p in points[-2:]]
    slope = math.log(m2 / m1) / math.log(b2 / b1)
    bound = atol + rtol * d.output_scale
    if slope > -0.1 or m2 <= bound:
        return None
    return math.ceil(b2 * (bound / m2) ** (1 / slope))


def _double(inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


def _first(value) -> Tensor:
    """The first output leaf (a tensor, a tuple's first, a dict's or ModelOutput's first field):
    the one the study follows."""
    return next(iter(named_leaves(value).values()))


@torch.no_grad()
def _forward(module: nn.Module, inputs: Sequence[Tensor], train: bool) -> Tensor:
    """One forward on a copy in train mode (statistics untouched; dropout and other random
    layers off, as in the parity matrix), or in place in eval."""
    if train:
        return _first(train_mode(copy.deepcopy(module))(*inputs))
    return _first(module.eval()(*inputs))


def _stateful(module: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in module.modules()
        if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
    ]


@torch.no_grad()
def population(subject: Subject, module: nn.Module) -> nn.Module:
    """``module`` (float64) with running statistics equal to the data's statistics.

    Layers: the known per-channel statistics.  Networks: a cumulative average over 16
    train-mode batches of 32 (``momentum = 1 / k`` set by hand, so InstanceNorm, which treats
    ``momentum=None`` as "frozen", averages too).
    """
    module = copy.deepcopy(module).double().eval()
    layers = _stateful(module)
    if not layers:
        return module
    if subject.data_stats is not None:
        mean, var = subject.data_stats
        for layer in layers:
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        return module
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
    train_mode(module)
    for k in range(16):
        for layer in layers:
            layer.momentum = 1.0 / (k + 1)
        module(*_double(subject.inputs(32, 9000 + k, False)))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return module.eval()


def batch_curve(subject: Subject, module: nn.Module, sizes: Sequence[int]) -> list[BatchPoint]:
    """Mean and max ``|train - eval|`` per batch size (``module`` at population statistics)."""
    points = []
    for size in sizes:
        draws = max(1, min(8, _SAMPLES_PER_POINT // size))
        means, maxes = [], []
        try:
            for d in range(draws):
                inputs = _double(subject.inputs(size, 1000 * size + d, False))
                diff = (_forward(module, inputs, True) - _forward(module, inputs, False)).abs()
                means.append(float(diff.mean()))
                maxes.append(float(diff.max()))
        except ValueError as err:  # e.g. one value per channel in training
            points.append(BatchPoint(size, None, None, first_line(err)))
            continue
        points.append(BatchPoint(size, sum(means) / len(means), max(maxes)))
    return points


def batch_mates(subject: Subject, module: nn.Module) -> tuple[float, float]:
    """Largest change of sample 0's output when its batch-mates change: (train, eval)."""
    first = _double(subject.inputs(MATES, 71, False))
    second = _double(subject.inputs(MATES, 72, False))
    for a, b in zip(first, second, strict=True):
        b[0] = a[0]
    found = []
    for train in (True, False):
        y1, y2 = _forward(module, first, train), _forward(module, second, train)
        found.append(float((y1[0] - y2[0]).abs().max()))
    return found[0], found[1]


@torch.no_grad()
def steps_curve(subject: Subject, momentum: float | None) -> StepsCurve:
    """Running statistics from the layer's random start over ``max(STEPS)`` training steps."""
    layer = subject.factory().double()
    if subject.data_stats is None or not _stateful(layer):
        raise ValueError(f"{subject.name}: the steps study needs a stateful standalone layer")
    layer.momentum = momentum
    layer.num_batches_tracked.zero_()  # a fresh count: momentum=None then averages from step 1
    mean, var = subject.data_stats
    held_out = _double(subject.inputs(HELD_OUT, 777, False))
    curve = StepsCurve(momentum, [], [], [], [])
    for step in range(max(STEPS) + 1):
        if step in STEPS:
            curve.steps.append(step)
            curve.mean_error.append(float(((layer.running_mean - mean).abs() / var.sqrt()).max()))
            curve.var_error.append(float((layer.running_var / var - 1).abs().max()))
            gap = _forward(layer, held_out, True) - _forward(layer, held_out, False)
            curve.output_gap.append(float(gap.abs().mean()))
        if step < max(STEPS):
            layer.train()(*_double(subject.inputs(STEP_BATCH, 5000 + step, False)))
    return curve


class NotMeasured(Exception):
    """The study cannot measure this subject; ``str(e)`` says why, for the report."""


def study(subject: Subject, *, with_steps: bool) -> Divergence:
    """The whole study for one subject (``with_steps``: the first subject of its family).

    Raises:
        NotMeasured: the train-mode forward still draws random numbers with its dropout layers
            off (functional dropout inside attention, as transformers writes it): train vs eval
            would measure the noise, not the statistics.
    """
    built = subject.factory()
    leaf = draws_random(lambda: copy.deepcopy(built), subject.inputs(*_PROBE_BATCH))
    if leaf is not None:
        raise NotMeasured(
            f"its training-mode forward draws random numbers outside nn.Dropout (output "
            f"{leaf!r} differs between two passes over one batch), so train vs eval would "
            "measure that noise"
        )
    module = population(subject, built)
    sizes = BATCH_SIZES if subject.kind == "layer" else NETWORK_BATCH_SIZES
    scale = float(
        _forward(module, _double(subject.inputs(HELD_OUT, 778, False)), False).abs().mean()
    )
    mates_train, mates_eval = batch_mates(subject, module)
    result = Divergence(
        subject=subject.name,
        kind=subject.kind,
        family=subject.family,
        output_scale=scale,
        batch_curve=batch_curve(subject, module, sizes),
        mates_train=mates_train,
        mates_eval=mates_eval,
    )
    if with_steps and subject.data_stats is not None and _stateful(built):
        result.steps = [steps_curve(subject, m) for m in MOMENTA]
    return result
