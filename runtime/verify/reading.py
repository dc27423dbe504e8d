"""The plain-language reading of a run: sentences generated from the measured numbers.

Nothing here is a conclusion written in advance: every sentence quotes the numbers it rests on
and comes out differently when they do (a layer that starts to depend on its batch-mates moves
from one list to the other).
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.verify.divergence import Divergence
from runtime.verify.parity import Cell

__all__ = ["reading"]


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    return f"{value:.2g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.1e}"


def _parity(cells: Sequence[Cell]) -> list[str]:
    if not cells:
        return []
    failed = [c for c in cells if c.status == "fail"]
    skipped = [c for c in cells if c.status == "skipped"]
    passed = len(cells) - len(failed) - len(skipped)
    opsets = ", ".join(str(o) for o in sorted({c.opset for c in cells}))
    dtypes = " and ".join(sorted({c.dtype for c in cells}, reverse=True))
    lines = []
    if failed:
        shown = "; ".join(f"`{c.id}`: {c.reason}" for c in failed[:8])
        more = f" (and {len(failed) - 8} more)" if len(failed) > 8 else ""
        lines.append(
            f"**{len(failed)} of {len(cells)} parity cells FAIL**: there the exported graph does "
            f"not compute what PyTorch computes: {shown}{more}."
        )
    else:
        lines.append(
            f"All {passed} parity cells that ran pass: PyTorch and the exported graphs agree "
            f"within tolerance in eval (onnxruntime and the reference evaluator), in training "
            f"(outputs and every running statistic over the fed-back steps) and after "
            f"recalibration, at opsets {opsets}, in {dtypes}."
        )
    for dtype in sorted({c.dtype for c in cells}, reverse=True):
        ran = [c for c in cells if c.dtype == dtype and c.worst is not None and c.status != "fail"]
        if ran:
            top = max(ran, key=lambda c: c.worst.ratio)
            lines.append(
                f"{dtype}: the largest error of a passing cell uses {top.worst.ratio:.0%} of its "
                f"tolerance (`{top.id}`, {top.worst.quantity}: {fmt(top.worst.max_abs)})."
            )
    if skipped:
        reasons = sorted({c.reason for c in skipped})
        lines.append(
            f"{len(skipped)} cells were skipped (not counted as passes): " + "; ".join(reasons)
        )
    return lines


def _names(items: Sequence[Divergence], value) -> str:
    return ", ".join(f"{d.subject} by {fmt(value(d))}" for d in items)


def _scale(items: Sequence[Divergence]) -> str:
    low = fmt(min(d.output_scale for d in items))
    high = fmt(max(d.output_scale for d in items))
    return f"about {low}" if low == high else f"{low} to {high}"


def _batch(divs: Sequence[Divergence]) -> list[str]:
    lines = []
    dependent = [d for d in divs if d.depends_on_batch]
    independent = [d for d in divs if not d.depends_on_batch]
    if dependent:
        lines.append(
            "A sample's **train-mode** output changes when its 7 batch-mates are replaced: "
            + _names(dependent, lambda d: d.mates_train)
            + f" (largest change of that sample's output; mean |output| is {_scale(dependent)})"
            + ": they normalize with batch statistics."
        )
    if independent:
        lines.append(
            "It does not change at all (largest change "
            + fmt(max(d.mates_train for d in independent))
            + ", float64) for: "
            + ", ".join(d.subject for d in independent)
            + ": their statistics are per sample."
        )
    eval_dependent = [d for d in divs if d.mates_eval > 1e-12 * max(1.0, d.output_scale)]
    if eval_dependent:
        lines.append(
            "In **eval** mode these still depend on their batch-mates: "
            + _names(eval_dependent, lambda d: d.mates_eval)
            + " (batch statistics without running statistics)."
        )
    else:
        lines.append(
            "In **eval** mode no subject depends on its batch-mates (largest change "
            + fmt(max((d.mates_eval for d in divs), default=0.0))
            + "): running statistics make inference per-sample."
        )
    for d in divs:
        points = [p for p in d.batch_curve if p.mean_abs is not None]
        if not points:
            continue
        first, last = points[0], points[-1]
        if max(p.mean_abs for p in points) <= 1e-12 * max(1.0, d.output_scale):
            continue
        if last.mean_abs < 0.5 * first.mean_abs:
            verdict = (
                f"falls {first.mean_abs / max(last.mean_abs, 1e-300):.0f}x as the batch grows: "
                "batch statistics approach the data's statistics"
            )
        else:
            verdict = (
                "does not shrink with the batch size: train mode and eval mode normalize with "
                "different statistics whatever the batch"
            )
        lines.append(
            f"{d.subject}: mean |train - eval| is {fmt(first.mean_abs)} at batch "
            f"{first.batch_size} and {fmt(last.mean_abs)} at batch {last.batch_size}; it "
            f"{verdict}."
        )
    same = [
        d.subject
        for d in divs
        if d.batch_curve and all(p.mean_abs == 0 for p in d.batch_curve if p.mean_abs is not None)
    ]
    if same:
        lines.append(
            "Train and eval outputs are identical (difference exactly 0) at every batch size "
            "for: " + ", ".join(same) + "."
        )
    return lines


def _steps(divs: Sequence[Divergence]) -> list[str]:
    lines = []
    for d in divs:
        for curve in d.steps:
            start, end = curve.mean_error[0], curve.mean_error[-1]
            where = f"{d.family}, momentum {curve.momentum}"
            if abs(end - start) <= 1e-12 * max(1.0, start):
                lines.append(
                    f"{where}: the running statistics never move (mean error stays "
                    f"{fmt(start)} std over {curve.steps[-1]} steps): this layer does not update "
                    "them with this momentum, so eval keeps the stale statistics."
                )
                continue
            if curve.momentum is None:
                where += " (cumulative average)"
            best = min(curve.mean_error)
            at = curve.steps[curve.mean_error.index(best)]
            lines.append(
                f"{where}: running-mean error {fmt(start)} -> {fmt(end)} data std after "
                f"{curve.steps[-1]} steps (best {fmt(best)} at step {at}), variance error "
                f"{fmt(curve.var_error[0])} -> {fmt(curve.var_error[-1])}, eval-vs-train gap "
                f"{fmt(curve.output_gap[0])} -> {fmt(curve.output_gap[-1])}."
            )
    return lines


def _recalibration(cells: Sequence[Cell]) -> list[str]:
    recal = [c for c in cells if c.mode == "recalibrate"]
    if not recal:
        return []
    subjects = sorted({c.subject for c in recal})
    bad = [c for c in recal if c.status == "fail"]
    worst = {
        dtype: max((c.worst.max_abs for c in recal if c.dtype == dtype and c.worst), default=0.0)
        for dtype in sorted({c.dtype for c in recal}, reverse=True)
    }
    if bad:
        return [
            f"Recalibration on onnxruntime differs from PyTorch's in {len(bad)} cells: "
            + ", ".join(f"`{c.id}`" for c in bad[:5])
            + "."
        ]
    return [
        f"Recalibration on onnxruntime (train graph over 3 unlabeled batches, statistics fed "
        f"back, eval graph rewritten) gives the same outputs as PyTorch's train-mode passes "
        f"then eval for all {len(subjects)} stateful subjects (largest error "
        + ", ".join(f"{dtype} {fmt(value)}" for dtype, value in worst.items())
        + ")."
    ]


def reading(cells: Sequence[Cell], divergences: Sequence[Divergence]) -> dict[str, list[str]]:
    """Sections of sentences: ``parity``, ``recalibration``, ``layers`` (batch dependence),
    ``steps`` (running statistics over training) and ``networks``."""
    layers = [d for d in divergences if d.kind == "layer"]
    networks = [d for d in divergences if d.kind != "layer"]
    return {
        "parity": _parity(cells),
        "recalibration": _recalibration(cells),
        "layers": _batch(layers) if layers else [],
        "steps": _steps(layers),
        "networks": _batch(networks) if networks else [],
    }
