"""Interleaved timing: steps, schedules sized to a time budget, and robust summaries.

Generic over what is timed (a layer, an onnxruntime session, a copy): a :class:`Step` is one
timed call and its untimed preparation.  :func:`time_interleaved` times every side in every
round (which side goes first alternates), so machine noise hits all sides alike; a warmup
sizes the :class:`Schedule` to the :class:`TimingPlan`'s budget; :func:`summarize` reports
the median and interquartile range.  Shared by :mod:`benchmarks.layers` and
:mod:`benchmarks.export`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Samples",
    "Schedule",
    "Step",
    "TimingPlan",
    "pin_threads",
    "plan_schedule",
    "rounds_order",
    "summarize",
    "time_cpu",
    "time_cuda",
    "time_interleaved",
]


@dataclass
class Step:
    """One timed call (``run``) and its untimed preparation (``prepare``)."""

    prepare: Callable[[], None]
    run: Callable[[], None]


def time_cpu(step: Step, inner: int) -> float:
    """Milliseconds per ``step.run()`` on the CPU, ``prepare`` excluded."""
    total = 0.0
    for _ in range(inner):
        step.prepare()
        start = time.perf_counter()
        step.run()
        total += time.perf_counter() - start
    return total / inner * 1e3


def time_cuda(step: Step, inner: int) -> float:
    """Milliseconds per step on the GPU between two CUDA events (``prepare`` included)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    step.prepare()
    torch.cuda.synchronize()
    start.record()
    for _ in range(inner):
        step.prepare()
        step.run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure one comparison.

    ``warmup`` rounds of ``min_inner`` steps per side, then between ``min_repeats`` and
    ``max_repeats`` rounds; each sample is the mean over ``inner`` steps, with ``inner`` in
    ``[min_inner, max_inner]``.  Both are sized so the rounds take about ``budget_s``.
    """

    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float
    min_inner: int
    max_inner: int


@dataclass(frozen=True)
class Schedule:
    """The chosen number of rounds and of steps per sample."""

    repeats: int
    inner: int


def plan_schedule(plan: TimingPlan, round_s: float) -> Schedule:
    """Spread the budget over ``max_repeats`` rounds, lengthening samples with ``inner`` first.

    ``round_s`` is the time of one round of single steps (every side once).
    """
    round_s = max(round_s, 1e-9)
    per_round = plan.budget_s / plan.max_repeats
    inner = max(plan.min_inner, min(plan.max_inner, int(per_round / round_s)))
    fit = int(plan.budget_s / (round_s * inner))
    return Schedule(max(plan.min_repeats, min(plan.max_repeats, fit)), inner)


def rounds_order(steps: dict[str, Step], index: int) -> list[str]:
    """Which side goes first alternates from round to round."""
    names = list(steps)
    return names if index % 2 == 0 else names[::-1]


@dataclass
class Samples:
    """Per-side samples (ms per step) and the steps averaged in each sample."""

    ms: dict[str, list[float]]
    inner: int


def time_interleaved(
    steps: dict[str, Step], plan: TimingPlan, timer: Callable[[Step, int], float]
) -> Samples:
    """Samples of ``steps`` measured round-robin after a warmup that sizes the schedule."""
    start = time.perf_counter()
    for index in range(plan.warmup):
        for name in rounds_order(steps, index):
            timer(steps[name], plan.min_inner)
    round_s = (time.perf_counter() - start) / max(plan.warmup * plan.min_inner, 1)
    schedule = plan_schedule(plan, round_s)
    ms: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(schedule.repeats):
        for name in rounds_order(steps, index):
            ms[name].append(timer(steps[name], schedule.inner))
    return Samples(ms, schedule.inner)


def summarize(samples: list[float]) -> tuple[float, float]:
    """Median and interquartile range of the samples (ms)."""
    if len(samples) < 2:
        return samples[0], 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return statistics.median(samples), q3 - q1


def pin_threads(threads: int) -> None:
    """Pin intra-op threads; inter-op threads to 1 where torch still allows it."""
    torch.set_num_threads(threads)
    # Raises once set, or once parallel work has started (e.g. a second main() in one process).
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
