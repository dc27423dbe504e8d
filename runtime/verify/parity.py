"""The parity matrix: PyTorch vs the exported graphs, cell by cell.

One :class:`Cell` per subject x opset x dtype x mode x runtime:

==============  ===============  ==========================================================
mode            runtime          compared with PyTorch
==============  ===============  ==========================================================
``eval``        ``onnxruntime``  the outputs, on two batches of different sizes
``eval``        ``reference``    the outputs (``onnx.reference.ReferenceEvaluator``), batch 1
``train``       ``onnxruntime``  the outputs and every updated running statistic after each
                                 of K training steps, the graph's ``.next`` outputs fed back
                                 (step 0 runs on the exported defaults)
``recalibrate`` ``onnxruntime``  :func:`runtime.recalibrate` on the train graph over three
                                 shifted batches, then the eval graph it returns on a held-out
                                 batch, vs PyTorch's train-mode passes then eval
==============  ===============  ==========================================================

Outputs are compared leaf by leaf, whatever ``forward`` returns (a tensor, tuples, lists,
dicts, transformers' ``ModelOutput``): :func:`export.outputs.named_leaves` flattens the PyTorch
side in the order the exported graph's outputs follow, and each check is named after the graph
output.  Train-mode passes (``train``, ``recalibrate``) run with the random layers in eval
(:mod:`runtime.verify.randomness`) on both sides.

A cell's status (the table in :mod:`runtime.verify.facts`): *pass* when every compared value
is within :mod:`runtime.verify.tolerances`, *fail* only for a value outside it; *skipped*
(never a pass) when the runtime reports it cannot run the graph (onnxruntime
``NOT_IMPLEMENTED``, ``NotImplementedError`` from the reference evaluator); *error* for any
other exception (creating the session, running the graph, the PyTorch side); *crash* when
onnxruntime died in the isolated child (:mod:`runtime.verify.isolate`).  The cells are run by
:func:`runtime.verify.matrix.verify_subject`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented
from torch import Tensor, nn

from normport.export.outputs import named_leaves
from normport.export.train_graph import state_pairs
from normport.runtime.messages import first_line
from normport.runtime.recalibration import recalibrate
from normport.runtime.sessions import cpu_session
from normport.runtime.verify._reference import reference
from normport.runtime.verify.randomness import train_mode
from normport.runtime.verify.subjects import Subject
from normport.runtime.verify.tolerances import Tolerance

__all__ = [
    "DTYPES",
    "EVAL_BATCHES",
    "MODES",
    "Cell",
    "Check",
    "compare",
    "error_cells",
    "first_lines",
    "mode_cells",
    "probe_feeds",
    "run_subject",
    "train_batches",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16}
MODES = ("eval", "train", "recalibrate")
RUNTIMES = {
    "eval": ("onnxruntime", "reference"),
    "train": ("onnxruntime",),
    "recalibrate": ("onnxruntime",),
}

# (batch_size, seed, alt): alt draws other sizes of the non-batch dynamic axes.
EXPORT_BATCH = (4, 0, False)
EVAL_BATCHES = ((4, 11, False), (1, 12, True))
_TRAIN_SIZES = (4, 7, 3, 5, 6, 2)
RECALIBRATION_BATCHES = ((6, 31, False), (3, 32, False), (8, 33, False))
HELD_OUT = (5, 41, False)
# Recalibration data comes from another "domain": floats mapped x -> SCALE * x + SHIFT.
SHIFT, SCALE = 0.5, 1.5


def train_batches(steps: int) -> tuple[tuple[int, int, bool], ...]:
    """K training steps: varying batch sizes, the second one with other spatial sizes."""
    return tuple((_TRAIN_SIZES[k % len(_TRAIN_SIZES)], 21 + k, k == 1) for k in range(steps))


@dataclass(frozen=True)
class Check:
    """One compared value: an output or a running statistic, at one step."""

    quantity: str
    step: int
    max_abs: float
    max_rel: float
    ratio: float  # max |a - e| / (atol + rtol |e|): <= 1 passes
    ok: bool


def compare(actual, expected, tol: Tolerance, quantity: str, step: int) -> Check:
    """``max |a - e|``, ``max |a - e| / max(|e|, atol)`` and the ``isclose`` verdict.

    Integers must be equal; a shape mismatch or a non-finite value where PyTorch has a finite
    one fails with infinite errors.
    """
    a = np.asarray(actual)
    e = np.asarray(expected)
    inf = float("inf")
    if a.shape != e.shape:
        return Check(quantity, step, inf, inf, inf, False)
    if np.issubdtype(e.dtype, np.integer):
        diff = np.abs(a.astype(np.int64) - e.astype(np.int64)).astype(np.float64)
        worst = float(diff.max(initial=0.0))
        return Check(quantity, step, worst, worst, inf if worst else 0.0, worst == 0.0)
    a, e = a.astype(np.float64), e.astype(np.float64)
    diff = np.abs(a - e)
    finite = bool(np.all(np.isfinite(a) == np.isfinite(e)))
    diff = np.where(np.isfinite(diff), diff, np.where(a == e, 0.0, np.inf))
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(e), tol.atol)).max(initial=0.0))
    allowed = tol.atol + tol.rtol * np.abs(e)
    ratio = float((diff / allowed).max(initial=0.0))
    ok = finite and bool(np.all(diff <= allowed))
    return Check(quantity, step, max_abs, max_rel, ratio if finite else inf, ok)


@dataclass
class Cell:
    """One cell of the matrix; ``status`` is one of :data:`runtime.verify.facts.STATUSES`."""

    subject: str
    kind: str
    opset: int
    dtype: str
    mode: str
    runtime: str
    atol: float
    rtol: float
    status: str = "pass"
    reason: str = ""
    batches: list[dict] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.mode}/{self.runtime}/{self.dtype}/opset{self.opset}"

    @property
    def worst(self) -> Check | None:
        return max(self.checks, key=lambda c: (not c.ok, c.max_abs), default=None)

    def finish(self) -> Cell:
        failing = [c for c in self.checks if not c.ok]
        if self.status == "pass" and failing:
            self.status = "fail"
            c = failing[0]
            self.reason = (
                f"{c.quantity} at step {c.step}: max abs error {c.max_abs:.3g} > tolerance "
                f"(atol {self.atol:g}, rtol {self.rtol:g})"
            )
        return self

    def to_json(self) -> dict:
        worst = self.worst
        return {
            "id": self.id,
            **{k: v for k, v in asdict(self).items() if k != "checks"},
            "max_abs": None if worst is None else worst.max_abs,
            "max_rel": None if worst is None else max(c.max_rel for c in self.checks),
            "worst": None if worst is None else f"{worst.quantity}@{worst.step}",
            "checks": [asdict(c) for c in self.checks],
        }


# -- inputs and the PyTorch side -------------------------------------------------------------


def _draw(subject: Subject, spec: tuple[int, int, bool], shift: bool = False) -> tuple:
    inputs = subject.inputs(*spec)
    if shift:
        inputs = tuple(t * SCALE + SHIFT if t.is_floating_point() else t for t in inputs)
    return inputs


def _torch_side(inputs: tuple[Tensor, ...], dtype: str) -> tuple[Tensor, ...]:
    """float16 rows: the reference sees the half-rounded input, in float64."""
    if dtype == "float32":
        return inputs
    return tuple(t.half().double() if t.is_floating_point() else t for t in inputs)


def _feeds(names: Sequence[str], inputs: tuple[Tensor, ...], dtype: str) -> dict:
    cast = DTYPES[dtype]
    return {
        n: (t.to(cast) if t.is_floating_point() else t).numpy()
        for n, t in zip(names, inputs, strict=True)
    }


def _reference_module(module: nn.Module, dtype: str) -> nn.Module:
    ref = copy.deepcopy(module)
    return ref if dtype == "float32" else ref.half().double()


def _outputs(value) -> list[np.ndarray]:
    """Every tensor leaf of a ``forward``'s return value, in the exported outputs' order."""
    return [v.detach().numpy() for v in named_leaves(value).values()]


def _torch_train(module: nn.Module, dtype: str) -> nn.Module:
    return train_mode(_reference_module(module, dtype))


def _compare_outputs(cell: Cell, names, got, expected, tol: Tolerance, step: int) -> None:
    if len(got) != len(expected):
        inf, what = float("inf"), f"{len(got)} outputs vs {len(expected)}"
        cell.checks.append(Check(what, step, inf, inf, inf, False))
        return
    for name, a, e in zip(names, got, expected, strict=True):
        cell.checks.append(compare(a, e, tol, name, step))


# -- the runtimes -----------------------------------------------------------------------------


class SessionError(Exception):
    """The runtime could not open the graph; ``__cause__`` is its exception."""


def _open(model: onnx.ModelProto, runtime: str):
    try:
        return cpu_session(model) if runtime == "onnxruntime" else reference(model)
    except Exception as err:
        raise SessionError(f"{runtime} could not create a session") from err


def first_lines(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` from an exception's first non-empty lines, never a traceback."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = ""
    for line in lines:
        if line.startswith(("Traceback", 'File "')) or (text and len(text) + len(line) > limit):
            break
        text = f"{text} {line}" if text else line
    text = text[:limit] or "(no message)"
    return f"{type(err).__name__}: {text}"


def _skip_reason(err: BaseException) -> str | None:
    if isinstance(err, SessionError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, OrtNotImplemented | NotImplementedError):
        return first_line(err, limit=300)
    return None


def _guarded(cell: Cell, body: Callable[[], None], crashed: str | None = None) -> Cell:
    """Run ``body``: its checks decide pass/fail; an exception is ``skipped`` or ``error``."""
    if crashed is not None:
        cell.status, cell.reason = "crash", crashed
        return cell
    try:
        body()
    except Exception as err:  # a runtime error is the cell's result, never verify's crash
        skip = _skip_reason(err)
        if skip:
            cell.status, cell.reason = "skipped", f"skipped: {skip}"
        elif isinstance(err, SessionError):
            cell.status, cell.reason = "error", f"{err}: {first_lines(err.__cause__ or err)}"
        else:
            cell.status = "error"
            cell.reason = f"{cell.runtime} failed running the graph: {first_lines(err)}"
    return cell.finish()


def _data_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    state = {name for pair in state_pairs(model) for name in pair}
    inits = {t.name for t in model.graph.initializer}
    ins = [i.name for i in model.graph.input if i.name not in state | inits]
    outs = [o.name for o in model.graph.output if o.name not in state]
    return ins, outs


def _eval_cells(subject, module, models_, dtype, tol, new_cell, crashes) -> list[Cell]:
    ref = _reference_module(module, dtype).eval()
    batches = [_draw(subject, spec) for spec in EVAL_BATCHES]
    with torch.no_grad():
        expected = [_outputs(ref(*_torch_side(b, dtype))) for b in batches]
    cells = []
    for opset, model in models_.items():
        in_names, out_names = _data_names(model)
        for runtime in RUNTIMES["eval"]:
            used = EVAL_BATCHES if runtime == "onnxruntime" else EVAL_BATCHES[:1]
            cell = new_cell(opset, "eval", runtime, used)

            def body(cell=cell, model=model, runtime=runtime, ins=in_names, outs=out_names):
                run = _open(model, runtime).run
                for step, batch in enumerate(batches[: len(cell.batches)]):
                    got = run(None, _feeds(ins, batch, dtype))
                    _compare_outputs(cell, outs, got, expected[step], tol, step)

            crashed = crashes.get(opset) if runtime == "onnxruntime" else None
            cells.append(_guarded(cell, body, crashed))
    return cells


def _train_cells(subject, module, models_, dtype, tol, steps, new_cell, crashes) -> list[Cell]:
    specs = train_batches(steps)
    batches = [_draw(subject, spec) for spec in specs]
    ref = _torch_train(module, dtype)
    expected = []
    with torch.no_grad():
        for batch in batches:
            outs = _outputs(ref(*_torch_side(batch, dtype)))
            buffers = {n: b.detach().numpy().copy() for n, b in ref.named_buffers()}
            expected.append((outs, buffers))
    cells = []
    for opset, model in models_.items():
        in_names, out_names = _data_names(model)
        pairs = state_pairs(model)
        cell = new_cell(opset, "train", "onnxruntime", specs)

        def body(cell=cell, model=model, in_names=in_names, out_names=out_names, pairs=pairs):
            sess = _open(model, "onnxruntime")
            state: dict[str, np.ndarray] = {}  # step 0: the exported defaults
            for step, batch in enumerate(batches):
                got = sess.run(None, {**_feeds(in_names, batch, dtype), **state})
                named = dict(zip(out_names + [o for _, o in pairs], got, strict=True))
                outs, buffers = expected[step]
                _compare_outputs(cell, out_names, [named[n] for n in out_names], outs, tol, step)
                for name, out in pairs:
                    if name not in buffers:  # the export carries a state PyTorch does not have
                        inf, what = float("inf"), f"{name} (no such buffer in the PyTorch module)"
                        cell.checks.append(Check(what, step, inf, inf, inf, False))
                        continue
                    cell.checks.append(compare(named[out], buffers[name], tol, name, step))
                state = {name: named[out] for name, out in pairs}

        cells.append(_guarded(cell, body, crashes.get(opset)))
    return cells


def _recalibration_cells(subject, module, models_, dtype, tol, new_cell, crashes) -> list[Cell]:
    """PyTorch replays its momentum over the batches: the compare is ``method="ema"``."""
    batches = [_draw(subject, spec, shift=True) for spec in RECALIBRATION_BATCHES]
    held_out = _draw(subject, HELD_OUT, shift=True)
    ref = _torch_train(module, dtype)
    with torch.no_grad():
        for batch in batches:
            ref(*_torch_side(batch, dtype))
        expected = _outputs(ref.eval()(*_torch_side(held_out, dtype)))
    cells = []
    for opset, model in models_.items():
        in_names, out_names = _data_names(model)
        cell = new_cell(opset, "recalibrate", "onnxruntime", (*RECALIBRATION_BATCHES, HELD_OUT))

        def body(cell=cell, model=model, in_names=in_names, out_names=out_names) -> None:
            feeds = [_feeds(in_names, b, dtype) for b in batches]
            eval_model = recalibrate(model, feeds, method="ema")
            got = _open(eval_model, "onnxruntime").run(None, _feeds(in_names, held_out, dtype))
            _compare_outputs(cell, out_names, got, expected, tol, len(batches))

        cells.append(_guarded(cell, body, crashes.get(opset)))
    return cells


def mode_cells(mode: str, subject, module, models_, dtype, tol, steps, new_cell, crashes):
    """The cells of one mode over ``models_`` (``{opset: model}``); ``crashes`` maps an opset
    whose onnxruntime session crashed the isolated child to the reason.

    Raises:
        Exception: whatever the PyTorch side raised on the batches.
    """
    if mode == "eval":
        return _eval_cells(subject, module, models_, dtype, tol, new_cell, crashes)
    if mode == "train":
        return _train_cells(subject, module, models_, dtype, tol, steps, new_cell, crashes)
    return _recalibration_cells(subject, module, models_, dtype, tol, new_cell, crashes)


def probe_feeds(subject: Subject, model: onnx.ModelProto, mode: str, dtype: str) -> dict:
    """The first feeds the cells of an export give onnxruntime (what the isolated child runs)."""
    spec = EVAL_BATCHES[0] if mode == "eval" else train_batches(1)[0]
    return _feeds(_data_names(model)[0], _draw(subject, spec), dtype)


def error_cells(
    status: str, modes: Sequence[str], opsets: Sequence[int], new_cell, reason: str
) -> list[Cell]:
    """Cells that could not run, every runtime of every mode and opset: ``status`` and why."""
    cells = []
    for mode in modes:
        for runtime in RUNTIMES[mode]:
            for opset in opsets:
                cell = new_cell(opset, mode, runtime, [])
                cell.status, cell.reason = status, reason[:500]
                cells.append(cell)
    return cells


def run_subject(
    subject: Subject,
    opsets: Sequence[int],
    dtypes: Sequence[str] = tuple(DTYPES),
    modes: Sequence[str] = MODES,
    steps: int = 3,
) -> list[Cell]:
    """Every cell of one subject (:func:`runtime.verify.matrix.verify_subject`'s cells)."""
    from normport.runtime.verify.matrix import verify_subject

    return verify_subject(subject, opsets, dtypes, modes, steps).cells
