"""The layer benchmark's output: run metadata, the aligned text table, the JSON file."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import torch

from benchmarks.layers.compare import MAX_ABS_DIFF
from benchmarks.layers.rows import MODE_TARGETS, RATIO_TARGET
from benchmarks.report import environment, verdict, write_report
from benchmarks.timing import TimingPlan

__all__ = ["format_table", "metadata", "write_json"]


def metadata(args: argparse.Namespace, cpu_plan: TimingPlan) -> dict[str, Any]:
    """Where and how the numbers were taken."""
    return {
        **environment(),
        "processor": platform.processor() or None,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
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
        "mode_targets": {"device": "cpu", **MODE_TARGETS},
        "max_abs_diff_limit": MAX_ABS_DIFF,
        "modes": {
            "eval": "module.eval(), forward under torch.no_grad()",
            "train": "module.train(), forward + y.backward(grad); grads set to None (untimed)",
        },
        "switchable_twin": (
            "SwitchableNorm2d has no torch.nn twin: compared with "
            "benchmarks.twins.ReferenceSwitchableNorm2d, a plain-torch composite (var_mean "
            "instance stats, layer/batch stats from them, softmax mix, "
            "(x - mean) / sqrt(var + eps))"
        ),
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _target(target: float | None, met: bool | None) -> str:
    """``<= 1.2 yes``: the mode's target and whether the row meets it; ``-`` where none."""
    return "-" if target is None else f"<= {target:g} {verdict(met)}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    header = [
        "layer",
        "shape",
        "mode",
        "device",
        "normport ms",
        "twin ms",
        "ratio",
        "ok",
        "target",
        "max|diff|",
        "valid",
    ]
    body = [
        [
            row["layer"] + (" (compiled)" if row.get("compiled") else ""),
            "x".join(str(d) for d in row["shape"]),
            row["mode"],
            row["device"],
            _num(row["normport_ms"], ".3f"),
            _num(row["twin_ms"], ".3f"),
            _num(row["ratio"], ".2f"),
            _flag(row["ok"]),
            _target(row.get("target"), row.get("target_met")),
            _num(row["max_abs_diff"], ".1e"),
            _flag(row["valid"]),
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
    """Write the report (:func:`benchmarks.report.write_report`)."""
    write_report(out, report)
