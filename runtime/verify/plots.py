"""The report's figures, with matplotlib's Agg backend (files only, no display).

- ``parity_<dtype>.png``: heatmap of log10(max abs error), rows subject x mode x runtime,
  columns opsets; failing cells marked ``FAIL``, skipped ones grey.
- ``divergence_batch_size.png`` / ``divergence_networks.png``: mean |train - eval| against the
  batch size, log-log; curves that are exactly 0 are drawn on a floor line and say so.
- ``divergence_steps.png``: running-statistics error and eval-vs-train gap over training
  steps, momentum 0.1 (solid) and None (dashed).
- ``batch_mates.png``: how much a sample's output moves when its batch-mates change, relative
  to the output's scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display

import matplotlib.pyplot as plt
import numpy as np

from runtime.verify.divergence import Divergence
from runtime.verify.parity import Cell

__all__ = ["draw"]

_FLOOR = 1e-16  # where exact zeros are drawn on log axes


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(cells: Sequence[Cell], dtype: str, path: Path) -> None:
    chosen = [c for c in cells if c.dtype == dtype]
    opsets = sorted({c.opset for c in chosen})
    rows = list(dict.fromkeys((c.subject, c.mode, c.runtime) for c in chosen))
    grid = np.full((len(rows), len(opsets)), np.nan)
    marks = {}
    for c in chosen:
        i, j = rows.index((c.subject, c.mode, c.runtime)), opsets.index(c.opset)
        worst = c.worst
        if c.status == "skipped":
            marks[(i, j)] = ("skip", "black")
        elif c.status == "fail":
            marks[(i, j)] = ("FAIL", "red")
        if worst is not None and c.status != "skipped" and math.isfinite(worst.max_abs):
            grid[i, j] = math.log10(max(worst.max_abs, _FLOOR))
    fig, ax = plt.subplots(figsize=(4.5 + 0.9 * len(opsets), 1.5 + 0.2 * len(rows)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-12, vmax=0)
    for i in range(len(rows)):
        for j in range(len(opsets)):
            text, color = marks.get((i, j), (f"{grid[i, j]:.1f}", "white"))
            if text != "nan":
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(len(opsets)), [f"opset {o}" for o in opsets], fontsize=8)
    ax.set_yticks(range(len(rows)), [" / ".join(r) for r in rows], fontsize=6)
    ax.set_title(f"{dtype}: log10 max abs error vs PyTorch\n(grey: skipped)", fontsize=9)
    fig.colorbar(image, ax=ax, label="log10 max abs error", shrink=0.5)
    _save(fig, path)


def _curve(ax, xs, ys, label: str, **style) -> None:
    zero = all(y == 0 for y in ys)
    drawn = [max(y, _FLOOR) for y in ys]
    ax.plot(xs, drawn, marker="o", markersize=3, label=label + (" (= 0)" if zero else ""), **style)


def _batch_sizes(divs: Sequence[Divergence], title: str, path: Path) -> None:
    """Non-zero curves log-log; the exactly-zero ones are named in a box, not drawn."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    zeros = []
    for d in divs:
        points = [p for p in d.batch_curve if p.mean_abs is not None]
        if all(p.mean_abs == 0 for p in points):
            zeros.append(d.subject)
            continue
        ax.plot(
            [p.batch_size for p in points],
            [max(p.mean_abs, _FLOOR) for p in points],
            marker="o",
            markersize=3,
            label=d.subject,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("mean |train - eval|")
    ax.set_title(title, fontsize=10)
    if zeros:
        ax.text(
            0.02, 0.02, "train == eval exactly (0) at every size:\n" + "\n".join(zeros),
            transform=ax.transAxes, fontsize=7, va="bottom",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
        )  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="upper right")
    ax.grid(True, which="major", alpha=0.3)
    _save(fig, path)


def _steps(divs: Sequence[Divergence], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = plt.get_cmap("tab10")
    fields = (
        ("mean_error", "running-mean error (data std)"),
        ("var_error", "running-var relative error"),
        ("output_gap", "mean |eval - train|, held-out batch"),
    )
    for k, d in enumerate(d for d in divs if d.steps):
        for curve in d.steps:
            style = {"color": colors(k), "linestyle": "-" if curve.momentum is not None else "--"}
            label = f"{d.family}, momentum {curve.momentum}"
            for ax, (name, _) in zip(axes, fields, strict=True):
                _curve(ax, [s + 1 for s in curve.steps], getattr(curve, name), label, **style)
    for ax, (_, ylabel) in zip(axes, fields, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training steps + 1")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("Running statistics converging to the data's (solid: 0.1, dashed: None)")
    _save(fig, path)


def _mates(divs: Sequence[Divergence], path: Path) -> None:
    """Change of sample 0's output relative to the mean |output|; exact zeros labelled."""
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.28 * len(divs)))
    y = np.arange(len(divs))
    for offset, mode, values in (
        (-0.2, "train mode", [d.mates_train / d.output_scale for d in divs]),
        (0.2, "eval mode", [d.mates_eval / d.output_scale for d in divs]),
    ):
        ax.barh(y + offset, values, height=0.4, label=mode)
        for yi, value in zip(y + offset, values, strict=True):
            if value == 0:
                ax.text(0, yi, " 0", va="center", fontsize=6)
    ax.set_yticks(y, [d.subject for d in divs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("max change of sample 0's output when its 7 batch-mates change / mean |output|")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)


def draw(out: Path, cells: Sequence[Cell], divergences: Sequence[Divergence]) -> list[str]:
    """Draw every figure the data allows under ``out / "plots"``; their paths relative to
    ``out``."""
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made = []

    def keep(name: str) -> Path:
        made.append(f"plots/{name}")
        return folder / name

    for dtype in sorted({c.dtype for c in cells}, reverse=True):
        _heatmap(cells, dtype, keep(f"parity_{dtype}.png"))
    layers = [d for d in divergences if d.kind == "layer"]
    networks = [d for d in divergences if d.kind != "layer"]
    if layers:
        _batch_sizes(
            layers, "Layers: train vs eval by batch size", keep("divergence_batch_size.png")
        )
    if networks:
        title = "Networks: train vs eval by batch size"
        _batch_sizes(networks, title, keep("divergence_networks.png"))
    if any(d.steps for d in layers):
        _steps(layers, keep("divergence_steps.png"))
    if divergences:
        _mates(divergences, keep("batch_mates.png"))
    return made
