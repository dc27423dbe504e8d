"""``python -m benchmarks.layers``: options, the CPU and GPU runs, the report.

The GPU part (when CUDA is available and ``--no-cuda`` is not given) times the same rows
eager and under ``torch.compile`` with CUDA events, and relates the eval forwards of
:data:`BANDWIDTH_LAYERS` to a device-to-device copy of the same tensor.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.cases import LayerCase, layer_cases
from benchmarks.layers.compare import MODES
from benchmarks.layers.report import format_table, metadata, write_json
from benchmarks.layers.rows import MODE_TARGETS, RATIO_TARGET, bench_rows, rounded
from benchmarks.options import layer_parser, parse
from benchmarks.timing import (
    Step,
    TimingPlan,
    pin_threads,
    summarize,
    time_cpu,
    time_cuda,
    time_interleaved,
)

__all__ = ["BANDWIDTH_LAYERS", "bandwidth_rows", "bench_cuda", "main", "parse_args"]

BANDWIDTH_LAYERS = ("LayerNorm", "BatchNorm2d")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (the shared ones: :mod:`benchmarks.options`)."""
    parser = layer_parser(
        "python -m benchmarks.layers",
        "Time normport's layers against their torch.nn twins (eval and train).",
        "reports/bench/layers.json",
    )
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
    args = parse(parser, argv)
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


# -- CUDA ---------------------------------------------------------------------------------------


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
                    "copy_ms": rounded(ref_ms),
                    "gb_per_s": rounded(nbytes / (ms * 1e-3) / 1e9, 1),
                    "copy_gb_per_s": rounded(nbytes / (ref_ms * 1e-3) / 1e9, 1),
                    "fraction_of_copy": rounded(ref_ms / ms, 3),
                }
            )
    return out


def bench_cuda(
    cases: list[LayerCase], modes: Sequence[str], plan: TimingPlan, compile_too: bool
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


def cuda_part(
    args: argparse.Namespace, cases: list[LayerCase], plan: TimingPlan
) -> tuple[dict[str, Any] | None, str | None]:
    """The GPU section, or None and the reason it was skipped."""
    if args.no_cuda:
        return None, "--no-cuda given"
    if not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False (no GPU on this machine)"
    _log("cuda:")
    return bench_cuda(cases, args.modes, plan, compile_too=not args.no_compile), None


# -- the run --------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON report, print the table; return the report."""
    args = parse_args(argv)
    pin_threads(args.threads)
    cases = layer_cases(args.layers)
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
    missed = [f"{r['layer']} {r['mode']}" for r in rows if r["target_met"] is False]
    targets = ", ".join(f"{mode} <= {t:g}" for mode, t in MODE_TARGETS.items())
    print(f"{len(missed)} rows miss their mode's target ({targets}): {missed or 'none'}")
    print(f"wrote {args.out}")
    return report
