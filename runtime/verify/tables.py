"""The report's markdown tables: one subject's parity cells, the opset matrix, the divergence.

Every error is given three ways: absolute ``max |a - e|``, relative ``max |a - e| / max(|e|,
atol)`` and against the tolerance, ``max |a - e| / (atol + rtol |e|)`` (<= 1 passes).  Cells
that could not run (``error``, ``crash``) and ``skipped`` cells are shown as such, with their
reason, and never as failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from normport.runtime.verify.divergence import Divergence, agreeing_batch
from normport.runtime.verify.parity import Cell
from normport.runtime.verify.tolerances import tolerance
from normport.runtime.verify.verdict import fmt

__all__ = ["LABELS", "divergence", "image", "matrix", "parity_table", "short"]

LABELS = {"pass": "ok", "fail": "**FAIL**", "skipped": "skip", "error": "ERR", "crash": "CRASH"}


def image(plots: Sequence[str], path: str) -> list[str]:
    return [f"![{Path(path).stem}]({path})"] if path in plots else []


def _ratio(cell: Cell) -> float | None:
    return max((k.ratio for k in cell.checks), default=None)


def short(cell: Cell | None) -> str:
    """One matrix entry: status and the worst error against the tolerance."""
    if cell is None:
        return ""
    ratio = _ratio(cell)
    if cell.status not in ("pass", "fail") or ratio is None:
        return LABELS.get(cell.status, cell.status)
    return f"{LABELS[cell.status]} {fmt(ratio)}x"


def parity_table(cells: Sequence[Cell]) -> list[str]:
    """One row per cell: abs, rel and x tolerance of its worst check, or why it did not run."""
    lines = [
        "| mode | runtime | dtype | opset | status | max abs | max rel | x tolerance "
        "| worst at | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        head = f"| {c.mode} | {c.runtime} | {c.dtype} | {c.opset} | {LABELS[c.status]} |"
        if c.checks and c.status in ("pass", "fail"):
            top = max(c.checks, key=lambda k: k.ratio)
            rel = max(k.max_rel for k in c.checks)
            numbers = (
                f" {fmt(max(k.max_abs for k in c.checks))} | {fmt(rel)} | {fmt(top.ratio)} | "
                f"{top.quantity} @ step {top.step} |"
            )
        else:
            numbers = " | | | |"
        note = c.reason.replace("|", "/").replace("\n", " ") if c.status != "pass" else ""
        lines.append(f"{head}{numbers} {note} |")
    return lines


def matrix(cells: Sequence[Cell], plots: Sequence[str]) -> list[str]:
    opsets = sorted({c.opset for c in cells})
    lines = []
    for dtype in sorted({c.dtype for c in cells}, reverse=True):
        rows: dict[tuple, dict[int, Cell]] = {}
        for c in cells:
            if c.dtype == dtype:
                rows.setdefault((c.subject, c.mode, c.runtime), {})[c.opset] = c
        lines += [
            f"### {dtype}",
            "",
            "Worst error against its tolerance per cell (`0.3x`: 30 % of the tolerance; over "
            "outputs, statistics and steps); ERR: could not export or run, CRASH: onnxruntime "
            "crashed, skip: the runtime cannot run the graph.",
            "",
            "| subject | mode | runtime | " + " | ".join(f"opset {o}" for o in opsets) + " |",
            "|---|---|---|" + "---|" * len(opsets),
        ]
        for (subject, mode, runtime), by_opset in rows.items():
            texts = " | ".join(short(by_opset.get(o)) for o in opsets)
            lines.append(f"| {subject} | {mode} | {runtime} | {texts} |")
        lines += ["", *image(plots, f"plots/parity_{dtype}.png"), ""]
    return lines


def _agree(d: Divergence, dtype: str) -> str:
    if all(p.mean_abs == 0 for p in d.batch_curve if p.mean_abs is not None):
        return "always (0)"
    tol = tolerance(dtype, "layer" if d.kind == "layer" else "network")
    at = agreeing_batch(d, tol.atol, tol.rtol)
    return "never" if at is None else f"B >= {at}"


def divergence(divs: Sequence[Divergence], plots: Sequence[str]) -> list[str]:
    if not divs:
        return []
    lines = [
        "## Divergence study",
        "",
        "float64 PyTorch on the normport layers (proved equal to the exported graphs above); "
        "running statistics set to the data's statistics (layers) or estimated by a cumulative "
        "average (networks).",
        "",
        "### Batch-mates: does a sample's output depend on the rest of its batch?",
        "",
        "Largest absolute change of sample 0's output when its 7 batch-mates are replaced "
        "(output units; 0 = exactly unchanged).",
        "",
        "| subject | family | train-mode change | eval-mode change | mean \\|output\\| "
        "| depends on batch |",
        "|---|---|---|---|---|---|",
    ]
    for d in divs:
        lines.append(
            f"| {d.subject} | {d.family} | {fmt(d.mates_train)} | {fmt(d.mates_eval)} | "
            f"{fmt(d.output_scale)} | {'yes' if d.depends_on_batch else 'no'} |"
        )
    lines += ["", *image(plots, "plots/batch_mates.png"), ""]
    for kind, title in (("layer", "Layers"), ("network", "Networks")):
        group = [d for d in divs if (d.kind == "layer") == (kind == "layer")]
        if not group:
            continue
        sizes = [p.batch_size for p in group[0].batch_curve]
        lines += [
            f"### {title}: mean |train - eval| by batch size",
            "",
            "Agree: the batch size from which mean |train - eval| stays within the model's eval "
            "tolerance (atol + rtol x mean |output|) for float32 / float16.",
            "",
            "| subject | " + " | ".join(f"B={s}" for s in sizes) + " | agree f32 | agree f16 |",
            "|---|" + "---|" * (len(sizes) + 2),
        ]
        for d in group:
            values = " | ".join(fmt(p.mean_abs) for p in d.batch_curve)
            lines.append(
                f"| {d.subject} | {values} | {_agree(d, 'float32')} | {_agree(d, 'float16')} |"
            )
        plot = "divergence_batch_size" if kind == "layer" else "divergence_networks"
        lines += ["", *image(plots, f"plots/{plot}.png"), ""]
    curves = [(d, c) for d in divs for c in d.steps]
    if curves:
        steps = curves[0][1].steps
        lines += [
            "### Running statistics over training steps",
            "",
            "Running-mean error in data standard deviations (max over channels), from the "
            "layer's random statistics with num_batches_tracked = 0, batches of 16:",
            "",
            "| family | momentum | " + " | ".join(f"k={k}" for k in steps) + " |",
            "|---|---|" + "---|" * len(steps),
        ]
        for d, c in curves:
            values = " | ".join(fmt(v) for v in c.mean_error)
            lines.append(f"| {d.family} | {c.momentum} | {values} |")
        lines += ["", *image(plots, "plots/divergence_steps.png"), ""]
    return lines
