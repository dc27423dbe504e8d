"""The report's figures, with matplotlib's Agg backend (files only, no display).

- ``parity_<dtype>.png``: heatmap of log10(max error / tolerance) per cell (0 = on the
  tolerance line), rows subject / mode / runtime, columns opsets; exact zeros, FAIL, ERR,
  CRASH and skip marked as such (:mod:`runtime.verify.plot_parity`).
- ``divergence_batch_size.png`` / ``divergence_networks.png``: mean |train - eval| against the
  batch size, log-log, with the batch size from which each model agrees within its float16 /
  float32 eval tolerance marked; curves that are exactly 0 are named in a box.
- ``divergence_steps.png``: running-statistics error and eval-vs-train gap over training
  steps, momentum 0.1 (solid) and None (dashed).
- ``batch_mates.png``: the largest change of a sample's output when its batch-mates change, in
  output units as the report's table, train and eval mode; exact zeros labelled.

Every figure has a title, axis labels with units, and its legend outside the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from normport.runtime.verify.divergence import Divergence, agreeing_batch
from normport.runtime.verify.facts import SubjectFacts
from normport.runtime.verify.parity import Cell
from normport.runtime.verify.plot_parity import heatmap, save
from normport.runtime.verify.tolerances import tolerance

__all__ = ["draw"]

_FLOOR = 1e-16  # where exact zeros are drawn on log axes


def _agreement(d: Divergence, dtype: str) -> tuple[float, int | None]:
    tol = tolerance(dtype, "layer" if d.kind == "layer" else "network")
    return tol.atol + tol.rtol * d.output_scale, agreeing_batch(d, tol.atol, tol.rtol)


_TOLERANCE_STYLE = {  # dtype: (tolerance line, marker at the first agreeing batch size)
    "float16": (":", {"marker": "o", "ms": 12, "mfc": "none", "mew": 1.8}),
    "float32": ("-.", {"marker": "*", "ms": 14, "mec": "black"}),
}


def _tolerance_key() -> list[Line2D]:
    """Legend entries, in grey, for the per-model tolerance lines and markers."""
    key = []
    for dtype, (style, marker) in _TOLERANCE_STYLE.items():
        key.append(Line2D([], [], color="0.4", ls=style, label=f"{dtype} eval tolerance"))
        key.append(
            Line2D([], [], color="0.4", ls="", **marker, label=f"first B within {dtype} tol.")
        )
    return key


def _batch_sizes(divs: Sequence[Divergence], title: str, path: Path) -> None:
    """Non-zero curves log-log, each with its float16 and float32 eval tolerance
    (``atol + rtol * mean |output|``) and a marker at the batch size from which it stays
    below; curves that are exactly 0 are named in the legend (nothing to draw on a log axis).
    """
    fig, ax = plt.subplots(figsize=(9, 5.5), layout="constrained")
    zeros, drawn = [], []
    colors = plt.get_cmap("tab10")
    for d in divs:
        points = [p for p in d.batch_curve if p.mean_abs is not None]
        if not points or all(p.mean_abs == 0 for p in points):
            zeros.append(d.subject)
            continue
        color = colors(len(drawn) % 10)
        sizes = [p.batch_size for p in points]
        drawn += sizes
        answers = []
        for dtype, (style, marker) in _TOLERANCE_STYLE.items():
            bound, at = _agreement(d, dtype)
            ax.hlines(bound, sizes[0], sizes[-1], colors=[color], linestyles=style, lw=1)
            answers.append(f"{dtype} from B={at}" if at else f"{dtype} not up to B={sizes[-1]}")
            if at is not None:
                y = next(p.mean_abs for p in points if p.batch_size == at)
                ax.plot(at, max(y, _FLOOR), color=color, ls="", **marker)
        ax.plot(
            sizes,
            [max(p.mean_abs, _FLOOR) for p in points],
            marker=".",
            color=color,
            label=f"{d.subject} (within tolerance: {', '.join(answers)})",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(drawn)) or [1]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("batch size B (samples per batch)")
    ax.set_ylabel("mean |train - eval| per output element (output units)")
    ax.set_title(title + "\nFrom which batch size do train and eval agree within tolerance?")
    handles, _ = ax.get_legend_handles_labels()
    handles += _tolerance_key() if drawn else []
    if zeros:
        text = "train == eval exactly (0) at every B: " + ", ".join(zeros)
        handles.append(Line2D([], [], ls="", label=text))
    if not drawn:
        ax.text(0.5, 0.5, "no curve above 0", transform=ax.transAxes, ha="center")
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    save(fig, path)


_STEP_PANELS = (
    ("mean_error", "Running mean vs data mean", "max over channels |error| (data std)"),
    ("var_error", "Running variance vs data variance", "max over channels |ratio - 1| (relative)"),
    ("output_gap", "Eval vs train output, held-out batch", "mean |eval - train| (output units)"),
)


def _steps(divs: Sequence[Divergence], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), layout="constrained")
    colors = plt.get_cmap("tab10")
    for k, d in enumerate(d for d in divs if d.steps):
        for curve in d.steps:
            style = {"color": colors(k % 10), "ls": "-" if curve.momentum is not None else "--"}
            for ax, (name, _, _) in zip(axes, _STEP_PANELS, strict=True):
                ys = getattr(curve, name)
                zero = all(y == 0 for y in ys)
                ax.plot(
                    [s + 1 for s in curve.steps],
                    [max(y, _FLOOR) for y in ys],
                    marker="o",
                    markersize=3,
                    label=f"{d.family}, momentum {curve.momentum}" + (" (= 0)" if zero else ""),
                    **style,
                )
    for ax, (_, title, ylabel) in zip(axes, _STEP_PANELS, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training steps + 1 (batches of 16)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(
        "Running statistics converging to the data's, from random statistics "
        "(solid: momentum 0.1, dashed: None = cumulative average)",
        fontsize=11,
    )
    fig.legend(
        handles, labels, loc="outside lower center", ncol=min(4, max(1, len(labels))), fontsize=8
    )
    save(fig, path)


def _mates(divs: Sequence[Divergence], path: Path) -> None:
    """Largest change of sample 0's output (output units); exact zeros labelled, not drawn."""
    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.45 * len(divs)), layout="constrained")
    y = np.arange(len(divs))
    series = (
        (-0.2, "train mode", [d.mates_train for d in divs], "tab:orange"),
        (0.2, "eval mode", [d.mates_eval for d in divs], "tab:blue"),
    )
    nonzero = [v for _, _, values, _ in series for v in values if v > 0]
    left = min(nonzero, default=1.0) / 30
    right = max(nonzero, default=1.0) * 3
    for offset, mode, values, color in series:
        widths = [v - left if v > 0 else 0.0 for v in values]
        ax.barh(y + offset, widths, left=left, height=0.38, label=mode, color=color)
        for yi, value in zip(y + offset, values, strict=True):
            if value == 0:  # no bar on a log axis: a mark at the edge and the words
                ax.plot(left, yi, marker=">", ms=7, color=color, clip_on=False)
                ax.text(left * 1.3, yi, f"{mode}: 0 (exact)", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    labels = [f"{d.subject}\nmean |output| {d.output_scale:.2g}" for d in divs]
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("largest |change| of sample 0's output (output units, float64)")
    ax.set_ylabel("subject (its mean |output|, output units)")
    ax.set_title(
        "Does a sample's output depend on its batch-mates?\n"
        "batch of 8, the 7 batch-mates replaced by fresh samples",
        fontsize=10,
    )
    fig.legend(fontsize=7, loc="outside right upper")
    ax.grid(True, axis="x", alpha=0.3)
    save(fig, path)


def draw(
    out: Path,
    cells: Sequence[Cell],
    divergences: Sequence[Divergence],
    facts: Sequence[SubjectFacts] = (),
) -> list[str]:
    """Draw every figure the data allows under ``out / "plots"``; their paths relative to
    ``out``.  ``facts``: the subjects' facts, as the report gets them; the figures themselves
    draw only on the cells and the divergence study."""
    del facts
    folder = Path(out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made = []

    def keep(name: str) -> Path:
        made.append(f"plots/{name}")
        return folder / name

    for dtype in sorted({c.dtype for c in cells}, reverse=True):
        heatmap(cells, dtype, keep(f"parity_{dtype}.png"))
    layers = [d for d in divergences if d.kind == "layer"]
    networks = [d for d in divergences if d.kind != "layer"]
    if layers:
        title = "Layers: train vs eval by batch size"
        _batch_sizes(layers, title, keep("divergence_batch_size.png"))
    if networks:
        title = "Networks: train vs eval by batch size"
        _batch_sizes(networks, title, keep("divergence_networks.png"))
    if any(d.steps for d in layers):
        _steps(layers, keep("divergence_steps.png"))
    if divergences:
        _mates(divergences, keep("batch_mates.png"))
    return made
