"""Benchmark every normport layer against its torch.nn twin, side by side in one run.

Run as ``python -m models.bench --threads 1 --out reports/bench/layers.json`` (``make bench``).

For each layer at a realistic shape and each mode

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
``ratio = normport_ms / twin_ms`` and ``ok`` means a valid row with ``ratio <= RATIO_TARGET``.

SwitchableNorm2d has no torch.nn twin; it is compared with :class:`ReferenceSwitchableNorm2d`,
the composite a user would write without normport (the structure of the authors' reference
implementation, in plain torch ops).

With CUDA available the same comparison also runs on the GPU, eager and under
``torch.compile`` (CUDA events around ``inner`` steps, gradient resets included), and the eval
forward of LayerNorm and BatchNorm2d is related to a device-to-device copy of the same tensor
(fraction of copy bandwidth).  A comparison that fails under ``torch.compile`` becomes a row
with an ``error`` instead of aborting the run.
Without CUDA the JSON records ``"cuda": null`` and ``"cuda_skipped"`` says why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import models
from models.convert import TorchSequenceBatchNorm

__all__ = ["ReferenceSwitchableNorm2d", "main"]

RATIO_TARGET = 1.5
"""A row is ``ok`` when normport takes at most this many times the twin's time (CPU target)."""

MAX_ABS_DIFF = 1e-3
"""normport and its twin must agree to below this (outputs and input gradients)."""

MODES = ("eval", "train")
SEED = 0


class ReferenceSwitchableNorm2d(nn.Module):
    """Switchable normalization written the way a user would without normport.

    Mirrors the structure of the authors' reference implementation (Luo et al., 2018):
    instance statistics with one ``var_mean`` call, layer and batch statistics derived from
    them through ``E[x^2] - E[x]^2`` on the (small) statistics, a softmax mix, then
    ``(x - mean) / sqrt(var + eps) * weight + bias``.  Variances are biased, as in normport.
    Parameter and buffer names equal normport's, so one state_dict loads into both.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``(N, C, H, W)`` with the softmax mix of instance, layer and batch stats."""
        n, c = x.shape[0], x.shape[1]
        x3 = x.reshape(n, c, -1)
        var_in, mean_in = torch.var_mean(x3, -1, correction=0, keepdim=True)
        square_in = var_in + mean_in.square()
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = square_in.mean(1, keepdim=True) - mean_ln.square()
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = square_in.mean(0, keepdim=True) - mean_bn.square()
            self._update_running(mean_bn, var_bn, n * x3.shape[-1])
        else:
            mean_bn = self.running_mean.view(1, c, 1)
            var_bn = self.running_var.view(1, c, 1)
        wm = torch.softmax(self.mean_weight, 0)
        wv = torch.softmax(self.var_weight, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        y = ((x3 - mean) / (var + self.eps).sqrt()).view_as(x)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        m = self.momentum
        self.num_batches_tracked.add_(1)
        self.running_mean.mul_(1 - m).add_(mean.flatten(), alpha=m)
        self.running_var.mul_(1 - m).add_(var.flatten() * (count / (count - 1)), alpha=m)


# -- the benchmarked layers -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One layer at one shape: how to build normport's module and its twin."""

    layer: str
    shape: tuple[int, ...]
    make_normport: Callable[[], nn.Module]
    make_twin: Callable[[], nn.Module] | None
    twin: str


def build_cases() -> list[Case]:
    """The benchmarked layers at realistic shapes (transformer tokens, CNN feature maps)."""
    tokens = (32, 128, 768)
    fmap = (8, 256, 28, 28)
    return [
        Case(
            "LayerNorm",
            tokens,
            lambda: models.LayerNorm(768),
            lambda: nn.LayerNorm(768),
            "torch.nn.LayerNorm",
        ),
        Case(
            "RMSNorm",
            tokens,
            lambda: models.RMSNorm(768),
            lambda: nn.RMSNorm(768),
            "torch.nn.RMSNorm",
        ),
        Case(
            "SequenceBatchNorm",
            tokens,
            lambda: models.SequenceBatchNorm(768),
            lambda: TorchSequenceBatchNorm(768),
            "torch.nn.BatchNorm1d on x.transpose(1, 2) (models.convert.TorchSequenceBatchNorm)",
        ),
        Case(
            "BatchNorm2d",
            fmap,
            lambda: models.BatchNorm2d(256),
            lambda: nn.BatchNorm2d(256),
            "torch.nn.BatchNorm2d",
        ),
        Case(
            "GroupNorm",
            fmap,
            lambda: models.GroupNorm(32, 256),
            lambda: nn.GroupNorm(32, 256),
            "torch.nn.GroupNorm",
        ),
        Case(
            "InstanceNorm2d",
            fmap,
            lambda: models.InstanceNorm2d(256, affine=True),
            lambda: nn.InstanceNorm2d(256, affine=True),
            "torch.nn.InstanceNorm2d(affine=True)",
        ),
        Case(
            "SwitchableNorm2d",
            fmap,
            lambda: models.SwitchableNorm2d(256),
            lambda: ReferenceSwitchableNorm2d(256),
            "composite reference in plain torch ops (models.bench.ReferenceSwitchableNorm2d)",
        ),
    ]


def select_cases(cases: list[Case], names: Sequence[str] | None) -> list[Case]:
    """The cases whose layer name is in ``names`` (case-insensitive); all when ``names`` is None."""
    if not names:
        return cases
    wanted = {name.strip().lower() for name in names if name.strip()}
    known = {case.layer.lower() for case in cases}
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(
            f"unknown layer(s) {unknown}; choose from {[case.layer for case in cases]}"
        )
    return [case for case in cases if case.layer.lower() in wanted]


# -- modules, inputs and one step -------------------------------------------------------------


def randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Give every floating parameter and buffer a random, non-trivial value (in place).

    Scales and variances stay positive; running statistics look like a trained network's.
    """
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
            if leaf in ("weight", "running_var"):
                value = torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype) + 0.5
            elif leaf in ("mean_weight", "var_weight"):
                value = noise
            else:  # bias, running_mean
                value = 0.2 * noise
            tensor.copy_(value)


def make_pair(
    case: Case, gen: torch.Generator, device: torch.device
) -> tuple[nn.Module, nn.Module | None]:
    """normport's module with random state and its twin loaded from the same state_dict."""
    ours = case.make_normport()
    randomize_(ours, gen)
    ours.to(device)
    if case.make_twin is None:
        return ours, None
    twin = case.make_twin().to(device)
    twin.load_state_dict(ours.state_dict(), strict=True)
    return ours, twin


def make_inputs(
    shape: tuple[int, ...], gen: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A shifted, scaled random input and a fixed random output gradient."""
    x = torch.randn(shape, generator=gen) * 2.0 + 0.5
    grad = torch.randn(shape, generator=gen)
    return x.to(device), grad.to(device)


@dataclass
class Step:
    """One timed call (``run``) and its untimed preparation (``prepare``)."""

    prepare: Callable[[], None]
    run: Callable[[], None]


def _reset_grads(module: nn.Module, x: Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)


def make_step(
    module: Callable[[Tensor], Tensor], params: nn.Module, mode: str, x: Tensor, grad: Tensor
) -> Step:
    """The step of ``mode``: an eval forward, or a train forward + backward.

    ``module`` is what is called (possibly a ``torch.compile`` wrapper); ``params`` is the
    underlying module, whose train/eval flag is set and whose gradients are reset.
    """
    params.train(mode == "train")
    if mode == "eval":
        x_eval = x.detach()

        def run_eval() -> None:
            with torch.no_grad():
                module(x_eval)

        return Step(prepare=lambda: None, run=run_eval)

    x_train = x.detach().requires_grad_(True)

    def run_train() -> None:
        module(x_train).backward(grad)

    return Step(prepare=lambda: _reset_grads(params, x_train), run=run_train)


# -- numerical agreement ----------------------------------------------------------------------


def outputs_of(
    module: Callable[[Tensor], Tensor], params: nn.Module, mode: str, x: Tensor, grad: Tensor
) -> dict[str, Tensor]:
    """What one step produces: ``y`` and, in train mode, the gradients of input and parameters."""
    params.train(mode == "train")
    if mode == "eval":
        with torch.no_grad():
            return {"y": module(x.detach())}
    xg = x.detach().requires_grad_(True)
    params.zero_grad(set_to_none=True)
    y = module(xg)
    y.backward(grad)
    out = {"y": y.detach(), "x.grad": xg.grad}
    out.update(
        {f"{name}.grad": p.grad for name, p in params.named_parameters() if p.grad is not None}
    )
    return out


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor], keys: Sequence[str]) -> float:
    """The largest ``|a - b|`` over ``keys`` (NaN where a key is missing or shapes differ)."""
    worst = 0.0
    for key in keys:
        if key not in a or key not in b or a[key].shape != b[key].shape:
            return math.nan
        diff = (a[key].double() - b[key].double()).abs().max().item()
        if math.isnan(diff):
            return math.nan
        worst = max(worst, diff)
    return worst


def max_rel_diff(a: dict[str, Tensor], b: dict[str, Tensor], keys: Sequence[str]) -> float:
    """The largest ``|a - b| / max(1, |b|)`` over ``keys`` (for sums over many elements)."""
    worst = 0.0
    for key in keys:
        if key not in a or key not in b or a[key].shape != b[key].shape:
            return math.nan
        ref = b[key].double()
        rel = ((a[key].double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
        worst = max(worst, rel)
    return worst


@dataclass
class Agreement:
    """How closely normport matches its twin for one layer and mode."""

    max_abs_diff: float
    param_grad_max_rel_diff: float | None
    valid: bool


def check_agreement(
    ours: Callable[[Tensor], Tensor],
    ours_params: nn.Module,
    twin: Callable[[Tensor], Tensor],
    twin_params: nn.Module,
    mode: str,
    x: Tensor,
    grad: Tensor,
) -> Agreement:
    """Compare one step of both sides.

    ``max_abs_diff`` covers ``y`` and (train) the input gradient; parameter gradients are sums
    over thousands of elements, so they are compared relative to ``max(1, |grad|)``.  Both
    must stay below :data:`MAX_ABS_DIFF` for the row to be valid.  The twin's state is reloaded
    from normport's afterwards, so the running statistics stay equal.
    """
    state = {k: v.clone() for k, v in ours_params.state_dict().items()}
    a = outputs_of(ours, ours_params, mode, x, grad)
    b = outputs_of(twin, twin_params, mode, x, grad)
    abs_keys = ["y", "x.grad"] if mode == "train" else ["y"]
    param_keys = sorted(k for k in a if k.endswith(".grad") and k != "x.grad")
    abs_diff = max_abs_diff(a, b, abs_keys)
    rel_diff = max_rel_diff(a, b, param_keys) if mode == "train" else None
    ours_params.load_state_dict(state)
    twin_params.load_state_dict(state)
    _reset_grads(ours_params, x)
    _reset_grads(twin_params, x)
    worst = max(abs_diff, rel_diff or 0.0)
    return Agreement(abs_diff, rel_diff, valid=bool(worst < MAX_ABS_DIFF))


# -- timing -----------------------------------------------------------------------------------


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


# -- one row ----------------------------------------------------------------------------------


def _rounded(value: float | None, digits: int = 4) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def _maybe_compile(module: nn.Module, compiled: bool) -> Callable[[Tensor], Tensor]:
    return torch.compile(module) if compiled else module


def bench_case(
    case: Case,
    mode: str,
    device: torch.device,
    plan: TimingPlan,
    timer: Callable[[Step, int], float],
    compiled: bool = False,
) -> dict[str, Any]:
    """Check and time normport against its twin for one layer and mode; one JSON row."""
    gen = torch.Generator().manual_seed(SEED)
    ours, twin = make_pair(case, gen, device)
    x, grad = make_inputs(case.shape, gen, device)
    ours_fn = _maybe_compile(ours, compiled)
    steps = {"normport": make_step(ours_fn, ours, mode, x, grad)}
    agreement = None
    if twin is not None:
        twin_fn = _maybe_compile(twin, compiled)
        agreement = check_agreement(ours_fn, ours, twin_fn, twin, mode, x, grad)
        steps["twin"] = make_step(twin_fn, twin, mode, x, grad)
    samples = time_interleaved(steps, plan, timer)
    ours_ms, ours_iqr = summarize(samples.ms["normport"])
    row: dict[str, Any] = {
        "layer": case.layer,
        "shape": list(case.shape),
        "mode": mode,
        "device": device.type,
        "compiled": compiled,
        "twin": case.twin,
        "normport_ms": _rounded(ours_ms),
        "normport_iqr_ms": _rounded(ours_iqr),
        "twin_ms": None,
        "twin_iqr_ms": None,
        "ratio": None,
        "ok": None,
        "max_abs_diff": None,
        "param_grad_max_rel_diff": None,
        "valid": None,
        "repeats": len(samples.ms["normport"]),
        "inner": samples.inner,
    }
    if agreement is not None:
        twin_ms, twin_iqr = summarize(samples.ms["twin"])
        ratio = round(ours_ms / twin_ms, 3)  # ok is judged on the ratio as reported
        row.update(
            twin_ms=_rounded(twin_ms),
            twin_iqr_ms=_rounded(twin_iqr),
            ratio=ratio,
            ok=bool(agreement.valid and ratio <= RATIO_TARGET),
            max_abs_diff=_rounded(agreement.max_abs_diff, 9),
            param_grad_max_rel_diff=_rounded(agreement.param_grad_max_rel_diff, 9),
            valid=agreement.valid,
        )
    return row


def error_row(
    case: Case, mode: str, device: torch.device, compiled: bool, exc: Exception
) -> dict[str, Any]:
    """A row for a comparison that could not run (e.g. a ``torch.compile`` failure)."""
    return {
        "layer": case.layer,
        "shape": list(case.shape),
        "mode": mode,
        "device": device.type,
        "compiled": compiled,
        "twin": case.twin,
        "normport_ms": None,
        "normport_iqr_ms": None,
        "twin_ms": None,
        "twin_iqr_ms": None,
        "ratio": None,
        "ok": None,
        "max_abs_diff": None,
        "param_grad_max_rel_diff": None,
        "valid": None,
        "repeats": 0,
        "inner": 0,
        "error": f"{type(exc).__name__}: {exc}"[:500],
    }


def bench_rows(
    cases: list[Case],
    modes: Sequence[str],
    device: torch.device,
    plan: TimingPlan,
    timer: Callable[[Step, int], float],
    compiled: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per case and mode, logging progress.

    Under ``torch.compile`` a failing comparison becomes an error row; eager failures raise.
    """
    rows = []
    for case in cases:
        for mode in modes:
            tag = f"{case.layer} {mode} {device.type}{' compiled' if compiled else ''}"
            log(f"  {tag} ...")
            try:
                rows.append(bench_case(case, mode, device, plan, timer, compiled))
            except Exception as exc:
                if not compiled:
                    raise
                rows.append(error_row(case, mode, device, compiled, exc))
    return rows


# -- CUDA ---------------------------------------------------------------------------------------


BANDWIDTH_LAYERS = ("LayerNorm", "BatchNorm2d")


def copy_ms(shape: tuple[int, ...], device: torch.device, plan: TimingPlan) -> float:
    """Median time of ``y.copy_(x)`` for a float32 tensor of ``shape`` (device to device)."""
    x = torch.randn(shape, device=device)
    y = torch.empty_like(x)

    def run_copy() -> None:
        y.copy_(x)

    step = Step(prepare=lambda: None, run=run_copy)
    samples = time_interleaved({"copy": step}, plan, time_cuda)
    return summarize(samples.ms["copy"])[0]


def bandwidth_rows(
    rows: list[dict[str, Any]], shapes_ms: dict[tuple[int, ...], float]
) -> list[dict[str, Any]]:
    """Achieved bandwidth of the eval forwards of :data:`BANDWIDTH_LAYERS` vs a copy.

    A normalization forward must read ``x`` once and write ``y`` once, exactly what the copy
    moves, so ``fraction_of_copy = copy_ms / forward_ms`` (1.0 = as fast as a copy).
    """
    out = []
    for row in rows:
        if row["layer"] not in BANDWIDTH_LAYERS or row["mode"] != "eval":
            continue
        shape = tuple(row["shape"])
        nbytes = 2 * math.prod(shape) * 4
        ref_ms = shapes_ms[shape]
        for side in ("normport", "twin"):
            ms = row[f"{side}_ms"]
            if ms is None:
                continue
            out.append(
                {
                    "layer": row["layer"],
                    "shape": list(shape),
                    "impl": side,
                    "compiled": row["compiled"],
                    "forward_ms": ms,
                    "copy_ms": _rounded(ref_ms),
                    "gb_per_s": _rounded(nbytes / (ms * 1e-3) / 1e9, 1),
                    "copy_gb_per_s": _rounded(nbytes / (ref_ms * 1e-3) / 1e9, 1),
                    "fraction_of_copy": _rounded(ref_ms / ms, 3),
                }
            )
    return out


def bench_cuda(
    cases: list[Case], modes: Sequence[str], plan: TimingPlan, compile_too: bool
) -> dict[str, Any]:
    """GPU rows (eager, and compiled unless disabled) plus the bandwidth comparison."""
    device = torch.device("cuda")
    rows = bench_rows(cases, modes, device, plan, time_cuda, log=_log)
    if compile_too:
        rows += bench_rows(cases, modes, device, plan, time_cuda, compiled=True, log=_log)
    shapes = {case.shape for case in cases if case.layer in BANDWIDTH_LAYERS}
    copies = {shape: copy_ms(shape, device, plan) for shape in shapes}
    return {
        "device_name": torch.cuda.get_device_name(device),
        "timer": "torch.cuda.Event elapsed_time over `inner` steps, synchronized",
        "rows": rows,
        "bandwidth": bandwidth_rows(rows, copies),
    }


# -- settings, output ---------------------------------------------------------------------------


def pin_threads(threads: int) -> None:
    """Pin intra-op threads; inter-op threads to 1 where torch still allows it."""
    torch.set_num_threads(threads)
    # Raises once set, or once parallel work has started (e.g. a second main() in one process).
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def metadata(args: argparse.Namespace, cpu_plan: TimingPlan) -> dict[str, Any]:
    """Where and how the numbers were taken."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "warmup": cpu_plan.warmup,
        "repeats": {
            "min": cpu_plan.min_repeats,
            "max": cpu_plan.max_repeats,
            "budget_s_per_row": cpu_plan.budget_s,
            "inner_steps_per_sample": [cpu_plan.min_inner, cpu_plan.max_inner],
        },
        "timer": (
            "time.perf_counter around each step (preparation excluded); a sample is the mean "
            "over `inner` steps; normport and twin alternate within every round (which goes "
            "first alternates too); *_ms is the median over `repeats` rounds, *_iqr_ms the "
            "interquartile range"
        ),
        "ratio": "normport_ms / twin_ms",
        "ratio_target": RATIO_TARGET,
        "max_abs_diff_limit": MAX_ABS_DIFF,
        "modes": {
            "eval": "module.eval(), forward under torch.no_grad()",
            "train": "module.train(), forward + y.backward(grad); grads set to None (untimed)",
        },
        "switchable_twin": (
            "SwitchableNorm2d has no torch.nn twin: compared with "
            "models.bench.ReferenceSwitchableNorm2d, a plain-torch composite (var_mean instance "
            "stats, layer/batch stats from them, softmax mix, (x - mean) / sqrt(var + eps))"
        ),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = [
        "layer",
        "shape",
        "mode",
        "device",
        "normport ms",
        "twin ms",
        "ratio",
        "ok",
        "max|diff|",
        "valid",
    ]
    body = [
        [
            row["layer"] + (" (compiled)" if row.get("compiled") else ""),
            "x".join(str(d) for d in row["shape"]),
            row["mode"],
            row["device"],
            num(row["normport_ms"], ".3f"),
            num(row["twin_ms"], ".3f"),
            num(row["ratio"], ".2f"),
            "-" if row["ok"] is None else ("yes" if row["ok"] else "NO"),
            num(row["max_abs_diff"], ".1e"),
            "-" if row["valid"] is None else ("yes" if row["valid"] else "NO"),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 1, 2, 3}

    def render(line: list[str]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in pairs)
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def write_json(report: dict[str, Any], out: Path) -> None:
    """Write the report, creating parent directories."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m models.bench",
        description="Time normport's layers against their torch.nn twins (eval and train).",
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/layers.json"))
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--layers", help="comma-separated layer names (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: eval,train")
    parser.add_argument("--max-repeats", type=int, default=30)
    parser.add_argument("--min-repeats", type=int, default=9)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=5.0,
        help="seconds per row (layer x mode) that size the repeats",
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip the GPU part")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile on GPU")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes must be a subset of {list(MODES)}")
    return args


def timing_plans(args: argparse.Namespace) -> tuple[TimingPlan, TimingPlan]:
    """CPU and GPU timing plans (GPU steps are short: many steps per CUDA-event sample)."""
    if args.quick:
        return TimingPlan(1, 3, 3, 0.0, 1, 1), TimingPlan(2, 3, 3, 0.0, 10, 10)
    repeats = (args.min_repeats, max(args.min_repeats, args.max_repeats))
    cpu = TimingPlan(3, *repeats, args.budget_s, min_inner=1, max_inner=100)
    gpu = TimingPlan(3, *repeats, args.budget_s / 2, min_inner=20, max_inner=1000)
    return cpu, gpu


def cuda_part(
    args: argparse.Namespace, cases: list[Case], plan: TimingPlan
) -> tuple[dict[str, Any] | None, str | None]:
    """The GPU section, or None and the reason it was skipped."""
    if args.no_cuda:
        return None, "--no-cuda given"
    if not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False (no GPU on this machine)"
    _log("cuda:")
    return bench_cuda(cases, args.modes, plan, compile_too=not args.no_compile), None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON report, print the table; return the report."""
    args = parse_args(argv)
    pin_threads(args.threads)
    cases = select_cases(build_cases(), args.layers.split(",") if args.layers else None)
    cpu_plan, gpu_plan = timing_plans(args)
    started = time.perf_counter()
    _log(f"cpu ({torch.get_num_threads()} thread(s)):")
    rows = bench_rows(cases, args.modes, torch.device("cpu"), cpu_plan, time_cpu, log=_log)
    cuda, cuda_skipped = cuda_part(args, cases, gpu_plan)
    report = {
        "metadata": {
            **metadata(args, cpu_plan),
            "elapsed_s": round(time.perf_counter() - started, 1),
        },
        "rows": rows,
        "cuda": cuda,
        "cuda_skipped": cuda_skipped,
    }
    write_json(report, args.out)
    print(format_table(rows))
    if cuda is not None:
        print("\ncuda:\n" + format_table(cuda["rows"]))
    slow = [f"{r['layer']} {r['mode']}" for r in rows if r["ok"] is False]
    print(f"\n{len(rows)} rows, {len(slow)} over ratio {RATIO_TARGET} or invalid: {slow or 'none'}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
