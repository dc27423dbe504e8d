"""Which exact form each layer is exported as, per target: the one table, with its measurements.

Several ONNX forms compute a layer exactly (the same math, statistics in float32 for half
types): the layer's standard op, normport's ONNX function, the folded ``X * s + t`` of a
BatchNorm in eval.  Runtimes do not run them equally fast.  :data:`CHOICES` names, per layer
kind, statistics and opset range, the form each target gets and the measurement behind it;
the lowerings ask :func:`choose` instead of deciding themselves.

Targets (:data:`export._emit.TARGETS`, ``export.to_onnx(..., target=...)``):

- ``"onnxruntime"`` (the default): the fastest exact form under onnxruntime's CPU provider, as
  measured on :data:`MEASURED_ON`.  A form other than the standard op is taken only when it is
  clearly faster (time ratio <= :data:`CLEAR_WIN`): two sessions of one file differ by up to
  15 % in one-thread timings on a shared machine, and on a tie the standard op stays (any
  runtime has a kernel for it, a function call is one more thing to inline).
- ``"standard"``: the standard op wherever the opset has one (the choice every export made
  before targets existed).

How the ratios were measured: each form of the layer case of :mod:`benchmarks.cases`
(LayerNorm, RMSNorm, SequenceBatchNorm ``(32, 128, 768)``; the others ``(8, 256, 28, 28)``),
exported by normport with the row forced to that form, or built by hand with the same numbers
where no lowering emits it (the folded BatchNorm, the transposed SequenceBatchNorm, a
batch-statistics function for InstanceNorm); float32, onnxruntime CPU, 1 intra-op thread,
ORT_ENABLE_ALL, fresh sessions per run, every form timed in every round (order alternating);
ratio = median over rounds of ``form / standard column`` within the round, then the median
over 3-7 runs, with a second session of the standard file as control (it moved by 1-15 %).
``python -m benchmarks.export`` times the two targets' files against each other and
torch.onnx's on every row, and says where a target is not met.

Not in the table, one form each (a function, for both targets): every training update
(``normport.*Train*``: ``BatchNormalization(training_mode=1)`` is not exact there, its
``running_var`` uses the biased variance, :mod:`export.lowerings._stats`), SwitchableNorm, eps
outside the root (``normport.NormalizeStdPlusEps``) and the batch statistics of BatchNorm /
SequenceBatchNorm without an update (``normport.BatchNormBatchStats``).  For the last,
``BatchNormalization(training_mode=1)`` (opset >= 14) would give ``Y`` exactly, and took 0.27x
the function's time on ``(8, 256, 28, 28)``; it needs placeholder statistics in and out and is
not emitted yet.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from normport.export._emit import TARGETS, Emitter
from normport.export._placeholder import LayerSpec

__all__ = [
    "ANY",
    "CHOICES",
    "CLEAR_WIN",
    "MEASURED_ON",
    "Choice",
    "Form",
    "choose",
    "statistics",
]


class Form(enum.StrEnum):
    """One exact way to write a layer in ONNX."""

    OP = "op"  # the layer's standard ONNX op (LayerNormalization, GroupNormalization-21, ...)
    FUNCTION = "function"  # one call of normport's model-local function (normport.GroupNorm)
    FOLDED = "folded"  # X * s + t, s and t folded from the running statistics at export


MEASURED_ON = "onnxruntime 1.32.0"
"""The runtime the onnxruntime column was measured on (CPU provider, 1 thread, float32)."""

CLEAR_WIN = 0.9
"""A form replaces the standard op for ``"onnxruntime"`` only at or below this time ratio."""

ANY = "any"  # the layer has no running statistics: one form in eval and train alike


@dataclass(frozen=True)
class Choice:
    """One row: the form of ``kind`` with ``statistics`` at ``opsets``, per target.

    ``measured``: ``(form, ratio)`` for each other exact form, its time over the time of the
    ``standard`` column's form (median ratio); empty where the function is the only exact form.
    """

    kind: str
    statistics: str  # ANY, "running" (eval statistics) or "batch" (batch statistics, no update)
    opsets: range
    standard: Form
    onnxruntime: Form
    measured: tuple[tuple[Form, float], ...]
    why: str

    def form(self, target: str) -> Form:
        return self.standard if target == "standard" else self.onnxruntime


OP, FUNCTION, FOLDED = Form.OP, Form.FUNCTION, Form.FOLDED
_ALL = range(13, 29)  # every opset normport exports (tests/test_export_choices.py keeps it so)

CHOICES: tuple[Choice, ...] = (
    # kind, statistics, opsets, standard, onnxruntime, measured, why
    Choice("layernorm", ANY, range(13, 17), FUNCTION, FUNCTION, (),
           "no standard op below opset 17; onnxruntime fuses normport.LayerNorm's chain into "
           "its LayerNormalization kernel"),
    Choice("layernorm", ANY, range(17, 29), OP, OP, ((FUNCTION, 1.01),),
           "a tie (opsets 17, 23, 28: 1.03, 1.02, 1.01): onnxruntime fuses normport.LayerNorm "
           "into the same LayerNormalization kernel"),
    Choice("rmsnorm", ANY, range(13, 23), FUNCTION, FUNCTION, (),
           "no standard op below opset 23; onnxruntime fuses normport.RMSNorm's chain into "
           "SimplifiedLayerNormalization"),
    Choice("rmsnorm", ANY, range(23, 29), OP, OP, ((FUNCTION, 0.96),),
           "a tie (opsets 23, 28: 0.97, 0.95, within the control's spread): "
           "onnxruntime's RMSNormalization kernel against normport.RMSNorm fused into "
           "SimplifiedLayerNormalization"),
    Choice("groupnorm", ANY, range(13, 21), FUNCTION, FUNCTION, (),
           "no standard op with per-channel scale below opset 21 (onnx's checker rejects "
           "GroupNormalization-18 in opsets 18-20)"),
    Choice("groupnorm", ANY, range(21, 29), OP, FUNCTION, ((FUNCTION, 0.31),),
           "normport.GroupNorm is three times as fast (opsets 21, 23, 28: 0.31, 0.32, 0.31; "
           "0.48 with a Mul + Add affine): onnxruntime has no CPU kernel for "
           "GroupNormalization-21 and expands its function body into 29 ops; the function runs "
           "as Reshape, InstanceNormalization, Reshape, BatchNormalization"),
    Choice("batchnorm", "running", _ALL, OP, OP, ((FOLDED, 3.0),),
           "BatchNormalization is one pass over X, the folded Mul then Add with (C, 1, 1) "
           "operands two (opsets 17, 23: 2.8, 3.2)"),
    Choice("instancenorm", "running", _ALL, OP, OP, ((FOLDED, 3.0),),
           "tracked running statistics make it BatchNorm in eval: the same BatchNormalization "
           "node, the same measurement"),
    Choice("instancenorm", "batch", _ALL, OP, OP, ((FUNCTION, 3.5),),
           "InstanceNormalization has a CPU kernel; a batch-statistics function over the "
           "spatial axes is a ReduceMean / Sub / Mul chain (opsets 17, 23: 3.6, 3.5)"),
    Choice("sequence_batchnorm", "running", _ALL, FOLDED, FOLDED, ((OP, 3.1),),
           "no standard op normalizes channel-last (N, L, C) as it is: the op needs a Transpose "
           "on each side, 3x slower than the folded X * s + t (opsets 17, 23: 3.2, 3.0; "
           "benchmarks.export times it as alt_ort)"),
)  # fmt: skip


def statistics(spec: LayerSpec) -> str:
    """The table's statistics axis of ``spec``: ``"running"``, ``"batch"`` or ``"update"``."""
    if spec.update_stats:
        return "update"
    return "batch" if spec.batch_stats else "running"


def choose(em: Emitter, spec: LayerSpec, offered: tuple[Form, ...], *, op_since: int = 0) -> Form:
    """The form of ``spec`` at ``em``'s opset for ``em``'s target.

    ``offered``: the forms the calling lowering emits; ``op_since``: the opset that defines
    its standard op.  A table row asking for another form, or for the op before it exists,
    is a bug of the table, raised here.
    """
    stats = statistics(spec)
    for row in CHOICES:
        if row.kind == spec.kind and row.statistics in (ANY, stats) and em.opset in row.opsets:
            form = row.form(em.target)
            if form is Form.OP and em.opset < op_since:
                offered = tuple(f for f in offered if f is not Form.OP)
            if form not in offered:
                raise RuntimeError(
                    f"the form table gives {spec.kind} ({stats} statistics, opset {em.opset}, "
                    f"target {em.target!r}) the form {form.value!r}, which its lowering does "
                    f"not emit (it emits {', '.join(f.value for f in offered)})"
                )
            return form
    raise LookupError(
        f"the form table has no row for {spec.kind} with {stats} statistics at opset "
        f"{em.opset}: measure the forms and add one (targets: {', '.join(TARGETS)})"
    )
