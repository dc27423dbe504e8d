"""One JSON row per layer, mode and device: agreement first, then interleaved timing.

A row holds both sides' median and interquartile range (ms), ``ratio = normport_ms /
twin_ms``, ``ok`` (a valid row with ``ratio <= RATIO_TARGET``) and, on the CPU, the mode's
target from :data:`MODE_TARGETS` with ``target_met``.  A comparison that fails under
``torch.compile`` becomes an :func:`error_row` with the same keys plus ``error``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.cases import LayerCase
from benchmarks.layers.compare import SEED, check_agreement, make_inputs, make_pair, make_step
from benchmarks.timing import Step, TimingPlan, summarize, time_interleaved
from benchmarks.twins import twin_name

__all__ = ["MODE_TARGETS", "RATIO_TARGET", "bench_case", "bench_rows", "error_row", "rounded"]

RATIO_TARGET = 1.5
"""A row is ``ok`` when normport takes at most this many times the twin's time (CPU target)."""

MODE_TARGETS = {"eval": 1.2, "train": 1.5}
"""Issue 12's CPU targets per mode (eval forward; train forward + backward): a CPU row's
``target``, and ``target_met`` when it is valid and its ratio is at most that."""


def rounded(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded for the report; None for None and NaN (JSON has no NaN)."""
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def _maybe_compile(module: nn.Module, compiled: bool) -> Callable[[Tensor], Tensor]:
    return torch.compile(module) if compiled else module


def _empty_row(case: LayerCase, mode: str, device: torch.device, compiled: bool) -> dict[str, Any]:
    """Every key of a row, in report order, with nothing measured yet."""
    return {
        "layer": case.layer,
        "shape": list(case.shape),
        "mode": mode,
        "device": device.type,
        "compiled": compiled,
        "twin": twin_name(case),
        "normport_ms": None,
        "normport_iqr_ms": None,
        "twin_ms": None,
        "twin_iqr_ms": None,
        "ratio": None,
        "ok": None,
        "target": MODE_TARGETS.get(mode) if device.type == "cpu" else None,
        "target_met": None,
        "max_abs_diff": None,
        "param_grad_max_rel_diff": None,
        "valid": None,
        "repeats": 0,
        "inner": 0,
    }


def bench_case(
    case: LayerCase,
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
    twin_fn = _maybe_compile(twin, compiled)
    agreement = check_agreement(ours_fn, ours, twin_fn, twin, mode, x, grad)
    steps["twin"] = make_step(twin_fn, twin, mode, x, grad)
    samples = time_interleaved(steps, plan, timer)
    ours_ms, ours_iqr = summarize(samples.ms["normport"])
    twin_ms, twin_iqr = summarize(samples.ms["twin"])
    ratio = round(ours_ms / twin_ms, 3)  # ok is judged on the ratio as reported
    row = _empty_row(case, mode, device, compiled)
    row.update(
        normport_ms=rounded(ours_ms),
        normport_iqr_ms=rounded(ours_iqr),
        twin_ms=rounded(twin_ms),
        twin_iqr_ms=rounded(twin_iqr),
        ratio=ratio,
        ok=bool(agreement.valid and ratio <= RATIO_TARGET),
        target_met=_target_met(row["target"], agreement.valid, ratio),
        max_abs_diff=rounded(agreement.max_abs_diff, 9),
        param_grad_max_rel_diff=rounded(agreement.param_grad_max_rel_diff, 9),
        valid=agreement.valid,
        repeats=len(samples.ms["normport"]),
        inner=samples.inner,
    )
    return row


def _target_met(target: float | None, valid: bool, ratio: float) -> bool | None:
    return None if target is None else bool(valid and ratio <= target)


def error_row(
    case: LayerCase, mode: str, device: torch.device, compiled: bool, exc: Exception
) -> dict[str, Any]:
    """A row for a comparison that could not run (e.g. a ``torch.compile`` failure)."""
    return {
        **_empty_row(case, mode, device, compiled),
        "error": f"{type(exc).__name__}: {exc}"[:500],
    }


def bench_rows(
    cases: list[LayerCase],
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
