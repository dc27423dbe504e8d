"""One subject through the parity matrix: export, isolate, compare, and what was measured.

:func:`verify_subject` runs, for one subject:

1. **random ops**: the random layers (dropout, ``DropPath``) are listed and set to eval for
   the train-mode comparisons; a forward that still draws random numbers in training mode
   (:func:`runtime.verify.randomness.draws_random`) makes its train and recalibrate cells
   ``error``: no export could match it, so comparing would blame the export.
2. **export** once per dtype and export mode (all opsets per trace); a subject without
   running statistics has no train graph (nothing to verify beyond eval), so no train or
   recalibration cells.  An export that raises makes its cells ``error``, naming the reason.
3. **isolation**: every exported graph is opened and run once by onnxruntime in a child
   process (:mod:`runtime.verify.isolate`); a graph that kills it makes its onnxruntime cells
   ``crash`` and is never opened in this process.
4. **cells** (:mod:`runtime.verify.parity`), then the eval **batch-mates** measurement
   (:func:`export.batch_mates.measure`), and the :class:`~runtime.verify.facts.SubjectFacts`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx
from torch import nn

from normport import export
from normport.export import batch_mates
from normport.runtime.verify import isolate, parity
from normport.runtime.verify.facts import SubjectFacts
from normport.runtime.verify.parity import Cell, error_cells, first_lines
from normport.runtime.verify.randomness import draws_random, random_modules, train_mode
from normport.runtime.verify.subjects import Subject
from normport.runtime.verify.tolerances import tolerance

__all__ = ["BATCH_MATES_BATCH", "SubjectResult", "verify_subject"]

BATCH_MATES_BATCH = (8, 51, False)  # (batch_size, seed, alt) for export.batch_mates.measure
_TRAIN_MODES = ("train", "recalibrate")


@dataclass
class SubjectResult:
    """A subject's cells and the facts measured beside them."""

    cells: list[Cell]
    facts: SubjectFacts


def _export(subject: Subject, module: nn.Module, mode: str, opsets, dtype: str):
    work = copy.deepcopy(module)  # export takes torch.nn norms and subclasses as they are
    work = train_mode(work) if mode == "train" else work.eval()
    return export.to_onnx_opsets(
        work,
        subject.inputs(*parity.EXPORT_BATCH),
        mode=mode,
        opsets=list(opsets),
        dtype=parity.DTYPES[dtype] if dtype != "float32" else None,
        dynamic=subject.dynamic,
        input_names=subject.input_names,
        output_names=subject.output_names,
    )


def _random_reason(subject: Subject, module: nn.Module) -> str | None:
    try:
        leaf = draws_random(lambda: copy.deepcopy(module), subject.inputs(*parity.EXPORT_BATCH))
    except Exception:  # the PyTorch side fails: the train cells report it
        return None
    if leaf is None:
        return None
    return (
        "the forward draws random numbers in training mode outside nn.Dropout (output "
        f"{leaf!r} differs between two train-mode passes over one batch under different "
        "seeds): no export can match it"
    )


def _measure_batch_mates(subject: Subject, module: nn.Module, facts: SubjectFacts, say) -> None:
    """Fill ``facts.batch_mates``, or ``facts.batch_mates_error`` when the measurement raises
    (reported as not measured, never as a parity result)."""
    try:
        batch = subject.inputs(*BATCH_MATES_BATCH)
        facts.batch_mates = batch_mates.measure(copy.deepcopy(module).eval(), tuple(batch))
    except Exception as err:
        facts.batch_mates_error = first_lines(err)
        say(f"batch-mates not measured: {facts.batch_mates_error}")


def _plan(modes: Sequence[str], stateful: bool, random_reason: str | None) -> dict[str, list]:
    """``{export mode: the parity modes its graphs serve}``."""
    plan = {"eval": [m for m in modes if m == "eval"]}
    if stateful and random_reason is None:
        plan["train"] = [m for m in modes if m in _TRAIN_MODES]
    return {k: v for k, v in plan.items() if v}


def verify_subject(
    subject: Subject,
    opsets: Sequence[int],
    dtypes: Sequence[str] = tuple(parity.DTYPES),
    modes: Sequence[str] = parity.MODES,
    steps: int = 3,
    progress: Callable[[str], None] | None = None,
) -> SubjectResult:
    """Every cell of one subject and its :class:`SubjectFacts` (see the module docstring).
    ``progress`` receives one line per stage (``"exporting eval float32 (opsets 13 23)..."``)."""
    say = progress or (lambda _line: None)
    module = subject.factory()
    stateful = list(subject.stateful(module))
    facts = SubjectFacts(
        subject.name, subject.kind, stateful_layers=stateful, random_modules=random_modules(module)
    )
    cells: list[Cell] = []
    wanted_train = [m for m in modes if m in _TRAIN_MODES] if stateful else []
    random_reason = _random_reason(subject, module) if wanted_train else None
    plan = _plan(modes, bool(stateful), random_reason)
    new_cells = {dtype: _cell_maker(subject, dtype) for dtype in dtypes}
    if random_reason is not None:
        for dtype in dtypes:
            cells += error_cells("error", wanted_train, opsets, new_cells[dtype], random_reason)
        facts.errors.append(f"{'/'.join(wanted_train)}: {random_reason}")

    exported: dict[tuple[str, str], dict[int, onnx.ModelProto]] = {}
    listed = " ".join(map(str, opsets))
    for dtype in dtypes:
        for export_mode, served in plan.items():
            say(f"exporting {export_mode} {dtype} (opsets {listed})...")
            try:
                exported[dtype, export_mode] = _export(subject, module, export_mode, opsets, dtype)
            except Exception as err:  # the export is part of what is verified
                reason = f"export failed: {first_lines(err, 400)}"
                cells += error_cells("error", served, opsets, new_cells[dtype], reason)
                facts.errors.append(f"{export_mode} {dtype}: {reason}")

    crashes = _isolate(subject, exported, say)
    for (dtype, export_mode, opset), reason in crashes.items():
        facts.errors.append(f"{export_mode} {dtype} opset {opset}: {reason}")

    for (dtype, export_mode), models_ in exported.items():
        tol = tolerance(dtype, subject.scope)
        crashed = {o: r for (d, m, o), r in crashes.items() if (d, m) == (dtype, export_mode)}
        for mode in plan[export_mode]:
            try:
                found = parity.mode_cells(
                    mode, subject, module, models_, dtype, tol, steps, new_cells[dtype], crashed
                )
            except Exception as err:  # PyTorch itself rejected the batches
                reason = f"PyTorch reference failed: {first_lines(err, 400)}"
                found = error_cells("error", [mode], opsets, new_cells[dtype], reason)
                facts.errors.append(f"{mode} {dtype}: {reason}")
            cells += found
            say(f"{mode} {dtype}: {_counts(found)}")

    _measure_batch_mates(subject, module, facts, say)
    ran = [c for c in cells if c.status in ("pass", "fail")]
    facts.modes_run = [m for m in parity.MODES if any(c.mode == m for c in ran)]
    facts.recalibrated = "recalibrate" in facts.modes_run
    return SubjectResult(cells, facts)


def _cell_maker(subject: Subject, dtype: str) -> Callable[..., Cell]:
    tol = tolerance(dtype, subject.scope)

    def new_cell(opset, mode, runtime, specs) -> Cell:
        batches = [{"batch_size": b, "seed": s, "alt": a} for b, s, a in specs]
        return Cell(
            subject.name, subject.kind, opset, dtype, mode, runtime, tol.atol, tol.rtol,
            batches=batches,
        )  # fmt: skip

    return new_cell


def _isolate(subject: Subject, exported: dict, say: Callable[[str], None]) -> dict:
    """``{(dtype, export mode, opset): crash reason}`` from one child over every graph."""
    keys, probes = [], []
    for (dtype, export_mode), models_ in exported.items():
        for opset, model in models_.items():
            try:
                feeds = parity.probe_feeds(subject, model, export_mode, dtype)
            except Exception:  # the cells report the failing draw
                continue
            keys.append((dtype, export_mode, opset))
            probes.append(isolate.Probe(model.SerializeToString(), feeds))
    if probes:
        say(f"opening {len(probes)} graphs in an isolated onnxruntime process...")
    found = isolate.probe(probes)
    return {
        key: f"{reason} for opset {key[2]} {key[0]} {key[1]}"
        for key, reason in zip(keys, found, strict=True)
        if reason is not None
    }


def _counts(cells: Sequence[Cell]) -> str:
    by: dict[str, int] = {}
    for c in cells:
        by[c.status] = by.get(c.status, 0) + 1
    return f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in by.items())
