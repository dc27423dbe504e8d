"""``parity_<dtype>.png``: each cell's worst error against its tolerance, as a heatmap.

Colour: ``log10(max |a - e| / (atol + rtol |e|))`` over the cell's checks, on a diverging map
centred on 0 (the tolerance line): blue below, red above.  Cells that are not a number say
what they are instead: ``0`` (exact: every compared value equal), ``FAIL`` (a value outside
tolerance, framed), ``ERR`` (cannot export / run), ``CRASH`` (onnxruntime died), ``skip``
(the runtime cannot run the graph).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.patches import Patch, Rectangle

from normport.runtime.verify.parity import Cell
from normport.runtime.verify.verdict import fmt

__all__ = ["heatmap", "save"]

LOW, HIGH = -6.0, 2.0  # log10 ratio range: a millionth of the tolerance to 100x over it
_FILL = {  # cells without a colour-mapped number
    "exact": ("#eef7ee", "0 (exact)", "black", "0 (exact): every value equal"),
    "error": ("#f4a261", "ERR", "black", "ERR: cannot export or run"),
    "crash": ("#6a0dad", "CRASH", "white", "CRASH: onnxruntime died"),
    "skipped": ("#c8c8c8", "skip", "black", "skip: runtime cannot run it"),
}


def save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _ratio(cell: Cell) -> float | None:
    return max((k.ratio for k in cell.checks), default=None)


def _kind(cell: Cell) -> str:
    """``exact``, ``number``, or a status without a number."""
    ratio = _ratio(cell)
    if cell.status in ("error", "crash", "skipped"):
        return cell.status
    if ratio is None:  # a failed cell without checks: a PyTorch-side error
        return "error" if cell.status != "fail" else "number"
    return "exact" if ratio == 0 else "number"


def heatmap(cells: Sequence[Cell], dtype: str, path: Path) -> None:
    chosen = [c for c in cells if c.dtype == dtype]
    opsets = sorted({c.opset for c in chosen})
    rows = list(dict.fromkeys((c.subject, c.mode, c.runtime) for c in chosen))
    labels = [" / ".join(r) for r in rows]
    grid = np.full((len(rows), len(opsets)), np.nan)
    width = 3.0 + 1.0 * len(opsets) + 0.07 * max(map(len, labels), default=10)
    fig, ax = plt.subplots(figsize=(width, 2.2 + 0.32 * len(rows)), layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="none")
    norm = TwoSlopeNorm(vmin=LOW, vcenter=0.0, vmax=HIGH)
    texts = []
    for c in chosen:
        i, j = rows.index((c.subject, c.mode, c.runtime)), opsets.index(c.opset)
        kind, ratio = _kind(c), _ratio(c)
        if kind in _FILL:
            face, text, color, _ = _FILL[kind]
            hatch = "///" if kind == "exact" else None  # not the white of the tolerance line
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=face, edgecolor="0.6", hatch=hatch)
            )
            texts.append((j, i, text, color, "normal"))
            continue
        finite = ratio is not None and math.isfinite(ratio)
        value = math.log10(ratio) if finite else HIGH
        grid[i, j] = min(max(value, LOW), HIGH)
        number = f"{fmt(ratio)}x" if finite else ("inf" if ratio is not None else "")
        dark = abs(norm(grid[i, j]) - 0.5) > 0.35
        color = "white" if dark else "black"
        if c.status == "fail":
            ax.add_patch(
                Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, edgecolor="black", lw=2)
            )
            texts.append((j, i, f"FAIL {number}".strip(), color, "bold"))
        else:
            texts.append((j, i, number, color, "normal"))
    image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for j, i, text, color, weight in texts:
        box = {"facecolor": "white", "edgecolor": "none", "pad": 1} if text == "0 (exact)" else None
        ax.text(
            j, i, text, ha="center", va="center", fontsize=7, color=color, weight=weight, bbox=box
        )
    ax.set_xlim(-0.5, len(opsets) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks(range(len(opsets)), [f"opset {o}" for o in opsets], fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("ONNX opset")
    ax.set_ylabel("subject / mode / runtime")
    ax.set_title(
        f"{dtype}: worst error against tolerance per cell, vs PyTorch\n"
        "(number: max |a - e| / (atol + rtol |e|); > 1 fails)",
        fontsize=9,
    )
    bar = fig.colorbar(image, ax=ax, extend="both")
    bar.set_label("log10(max error / tolerance)\n0 = tolerance line, -2 = 1 % of it", fontsize=8)
    shown = {_kind(c) for c in chosen}
    handles = [
        Patch(facecolor=f, edgecolor="0.6", hatch="///" if k == "exact" else None, label=lab)
        for k, (f, _, _, lab) in _FILL.items()
        if k in shown
    ]
    if any(c.status == "fail" for c in chosen):
        handles.append(Patch(fill=False, edgecolor="black", lw=2, label="FAIL: outside tolerance"))
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=7,
            frameon=False,
        )  # fmt: skip
    save(fig, path)
