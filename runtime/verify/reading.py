"""The plain-language reading of a run: sentences generated from the measured numbers.

Nothing here is a conclusion written in advance: every sentence quotes the numbers it rests on
and comes out differently when they do (a layer that starts to depend on its batch-mates moves
from one list to the other).  What a model's sentences claim comes from its
:class:`~runtime.verify.facts.SubjectFacts` and its cells only: no "running statistics" for a
model without them, no recalibration claim when none ran, no dropout sentence without dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

from normport.runtime.verify.divergence import Divergence, agreeing_batch, extrapolated_batch
from normport.runtime.verify.facts import SubjectFacts
from normport.runtime.verify.parity import Cell
from normport.runtime.verify.tolerances import tolerance
from normport.runtime.verify.verdict import fmt, worst

__all__ = ["batch_size_answer", "fmt", "reading", "subject_reading"]

_RAN = ("pass", "fail")
_BROKEN = ("error", "crash")
_RUNTIMES = {"onnxruntime": "onnxruntime", "reference": "onnx's reference evaluator"}


def _join(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _outcome(cells: Sequence[Cell]) -> str:
    bad = sum(c.status == "fail" for c in cells)
    n = len(cells)
    return f"{n} cells, all within tolerance" if not bad else f"{n} cells, {bad} FAIL"


def _compared(cells: Sequence[Cell]) -> str | None:
    """What was compared with PyTorch, mode by mode, only where a cell compared numbers."""
    ran = [c for c in cells if c.status in _RAN]
    if not ran:
        return None
    parts = []
    evals = [c for c in ran if c.mode == "eval"]
    if evals:
        runtimes = " and ".join(_RUNTIMES.get(r, r) for r in sorted({c.runtime for c in evals}))
        parts.append(f"eval outputs on {runtimes} ({_outcome(evals)})")
    train = [c for c in ran if c.mode == "train"]
    if train:
        outputs = {k.quantity for c in ran if c.mode != "train" for k in c.checks}
        state = sorted({k.quantity for c in train for k in c.checks} - outputs)
        steps = 1 + max((k.step for c in train for k in c.checks), default=0)
        what = (
            f"outputs and {len(state)} running statistics ({_join(state)})"
            if outputs
            else f"{len(state)} compared values ({_join(state)})"
        )
        parts.append(f"training over {steps} fed-back steps: {what} ({_outcome(train)})")
    recal = [c for c in ran if c.mode == "recalibrate"]
    if recal:
        parts.append(f"outputs after recalibration on unlabeled batches ({_outcome(recal)})")
    opsets = ", ".join(str(o) for o in sorted({c.opset for c in ran}))
    dtypes = " and ".join(sorted({c.dtype for c in ran}, reverse=True))
    return f"Compared with PyTorch at opsets {opsets} in {dtypes}: " + "; ".join(parts) + "."


def _not_compared(facts: SubjectFacts, cells: Sequence[Cell]) -> list[str]:
    modes = {c.mode for c in cells if c.status in _RAN}
    if not facts.stateful_layers and "train" not in modes:
        return [
            "No layer keeps running statistics, so there is no train graph: training and "
            "recalibration are not compared (eval only)."
        ]
    names = {"eval": "eval", "train": "training", "recalibrate": "recalibration"}
    broken = {c.mode for c in cells if c.status in _BROKEN}
    lines = []
    for mode, what in names.items():
        if mode in modes:
            continue
        if mode in broken:
            lines.append(
                f"{what.capitalize()} is not compared: its cells could not run (ERR/CRASH)."
            )
        elif mode != "eval" and facts.stateful_layers:
            n = len(facts.stateful_layers)
            lines.append(
                f"{what.capitalize()} is not compared in this run, though {n} "
                f"{'layer keeps' if n == 1 else 'layers keep'} running statistics "
                f"({_join([path or '<the model itself>' for path in facts.stateful_layers])})."
            )
    return lines


def _random(facts: SubjectFacts, cells: Sequence[Cell]) -> list[str]:
    if not facts.random_modules or not any(
        c.mode in ("train", "recalibrate") and c.status in _RAN for c in cells
    ):
        return []
    return [
        f"Random modules ({_join(facts.random_modules)}) were set to eval for the train-mode "
        "comparisons so that both sides are deterministic: their train-mode randomness is not "
        "compared."
    ]


def _mates(facts: SubjectFacts) -> list[str]:
    mates = facts.batch_mates
    if mates is None:
        if facts.batch_mates_error:
            return [
                f"Whether eval outputs depend on batch-mates was not measured "
                f"({facts.batch_mates_error}): dynamic batching is not known to be safe."
            ]
        return []
    if mates.independent:
        largest = max(mates.outputs.values(), default=0.0)
        return [
            f"Every eval output of a sample is independent of its batch-mates (largest relative "
            f"change {fmt(largest)}, threshold {fmt(mates.threshold)}): dynamic batching is safe."
        ]
    return []  # the verdict's WARN reason says it


def _worst_by_dtype(cells: Sequence[Cell]) -> list[str]:
    lines = []
    for dtype in sorted({c.dtype for c in cells}, reverse=True):
        top = worst([c for c in cells if c.dtype == dtype])
        if top is not None:
            lines.append(f"{dtype}: {top}; max abs {fmt(top.max_abs)} at step {top.step}.")
    return lines


def batch_size_answer(d: Divergence) -> str | None:
    """From which batch size train and eval agree within this model's eval tolerances."""
    points = [p for p in d.batch_curve if p.mean_abs is not None]
    if not points:
        return None
    sizes = f"{points[0].batch_size}-{points[-1].batch_size}"
    if all(p.mean_abs == 0 for p in points):
        return f"{d.subject}: train and eval outputs are identical (exactly 0) at batch {sizes}."
    scope = "layer" if d.kind == "layer" else "network"
    parts = []
    for dtype in ("float32", "float16"):
        tol = tolerance(dtype, scope)
        bound = tol.atol + tol.rtol * d.output_scale
        at = agreeing_batch(d, tol.atol, tol.rtol)
        if at is None:
            guess = extrapolated_batch(d, tol.atol, tol.rtol)
            parts.append(
                f"not within the {dtype} {scope} tolerance ({fmt(bound)}) up to batch "
                f"{points[-1].batch_size} (still {fmt(points[-1].mean_abs)} there"
                + (f"; about batch {guess:,} by the last slope" if guess else "")
                + ")"
            )
        else:
            parts.append(f"within the {dtype} {scope} tolerance ({fmt(bound)}) from batch {at}")
    return (
        f"{d.subject}: mean |train - eval| is " + "; ".join(parts) + " (tolerance = atol + "
        f"rtol x mean |output| {fmt(d.output_scale)})."
    )


def subject_reading(
    facts: SubjectFacts,
    cells: Sequence[Cell],
    div: Divergence | None = None,
    *,
    claims: bool = True,
) -> list[str]:
    """One model's sentences (the verdict line comes before them): worst errors, what was
    compared and what was not, random modules, batch-mates, batch size.

    ``claims=False`` (facts derived from the cells, not measured on the model): no sentence
    about its layers, random modules or batch-mates.
    """
    cells = [c for c in cells if c.subject == facts.name]
    lines = _worst_by_dtype(cells)
    compared = _compared(cells)
    lines += [compared] if compared else []
    if claims:
        lines += _not_compared(facts, cells) + _random(facts, cells) + _mates(facts)
    answer = batch_size_answer(div) if div is not None else None
    return lines + ([answer] if answer else [])


def _parity(cells: Sequence[Cell]) -> list[str]:
    if not cells:
        return []
    by = {s: [c for c in cells if c.status == s] for s in ("pass", "fail", "skipped")}
    broken = [c for c in cells if c.status in _BROKEN]
    lines = []
    if by["fail"]:
        shown = "; ".join(f"`{c.id}`: {c.reason}" for c in by["fail"][:8])
        more = f" (and {len(by['fail']) - 8} more)" if len(by["fail"]) > 8 else ""
        lines.append(
            f"**{len(by['fail'])} of {len(cells)} parity cells FAIL**: there the exported graph "
            f"does not compute what PyTorch computes: {shown}{more}."
        )
    elif by["pass"]:
        compared = _compared(by["pass"]) or ""
        lines.append(f"All {len(by['pass'])} parity cells that ran pass. " + compared)
    for dtype in sorted({c.dtype for c in cells}, reverse=True):
        top = worst([c for c in by["pass"] if c.dtype == dtype])
        if top is not None:
            lines.append(f"{dtype}, passing cells: {top}.")
    if broken:
        kinds = sorted({f"{c.status} in {c.mode}: {c.reason}" for c in broken})
        lines.append(
            f"{len(broken)} cells could not run (errors and crashes, not parity failures): "
            + "; ".join(kinds[:6])
        )
    if by["skipped"]:
        reasons = sorted({c.reason for c in by["skipped"]})
        lines.append(
            f"{len(by['skipped'])} cells were skipped (not counted as passes): "
            + "; ".join(reasons)
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
            + f" (largest absolute change of that sample's output; mean |output| is "
            f"{_scale(dependent)}): they normalize with batch statistics."
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
        if not points or max(p.mean_abs for p in points) <= 1e-12 * max(1.0, d.output_scale):
            continue
        first, last = points[0], points[-1]
        if last.mean_abs < 0.5 * first.mean_abs:
            trend = (
                f"falls {first.mean_abs / max(last.mean_abs, 1e-300):.0f}x as the batch grows: "
                "batch statistics approach the data's statistics"
            )
        else:
            trend = (
                "does not shrink with the batch size: train mode and eval mode normalize with "
                "different statistics whatever the batch"
            )
        lines.append(
            f"{d.subject}: mean |train - eval| is {fmt(first.mean_abs)} at batch "
            f"{first.batch_size} and {fmt(last.mean_abs)} at batch {last.batch_size}; it "
            f"{trend}."
        )
    return lines  # the batch-size answers are in each model's section


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
    recal = [c for c in cells if c.mode == "recalibrate" and c.status in _RAN]
    if not recal:
        return []
    subjects = sorted({c.subject for c in recal})
    bad = [c for c in recal if c.status == "fail"]
    if bad:
        return [
            f"Recalibration on onnxruntime differs from PyTorch's in {len(bad)} cells: "
            + ", ".join(f"`{c.id}`" for c in bad[:5])
            + "."
        ]
    tops = {d: worst([c for c in recal if c.dtype == d]) for d in sorted({c.dtype for c in recal})}
    return [
        f"Recalibration on onnxruntime (train graph over 3 unlabeled batches, statistics fed "
        f"back, eval graph rewritten) gives the same outputs as PyTorch's train-mode passes "
        f"then eval for {len(subjects)} subjects ({', '.join(subjects)}); "
        + ", ".join(f"{d} {t}" for d, t in reversed(tops.items()) if t)
        + "."
    ]


def reading(
    cells: Sequence[Cell],
    divergences: Sequence[Divergence],
    facts: Sequence[SubjectFacts] = (),
) -> dict:
    """Sections of sentences: ``parity``, ``recalibration``, ``layers`` (batch dependence),
    ``steps`` (running statistics over training), ``networks``, and ``subjects`` (one list of
    sentences per model with facts)."""
    layers = [d for d in divergences if d.kind == "layer"]
    networks = [d for d in divergences if d.kind != "layer"]
    divs = {d.subject: d for d in divergences}
    return {
        "parity": _parity(cells),
        "recalibration": _recalibration(cells),
        "layers": _batch(layers) if layers else [],
        "steps": _steps(layers),
        "networks": _batch(networks) if networks else [],
        "subjects": {f.name: subject_reading(f, cells, divs.get(f.name)) for f in facts},
    }
