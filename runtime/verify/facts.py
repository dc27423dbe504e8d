"""What verify measured about one subject, beside its parity cells: the report's only source.

The report's sentences and the verdict line come from these facts and the cells, never from
assumptions about a kind of model: no "every running statistic" for a model without one, no
recalibration claim when none ran, no "disabled dropout" when it had none.

Cell statuses (:class:`runtime.verify.parity.Cell`):

=========  ===================================================================================
``pass``   every compared value within tolerance
``fail``   a compared value outside tolerance: the export computes something else (exit 1)
``skipped`` the runtime reports it cannot run the graph (``NOT_IMPLEMENTED``); never a pass
``error``  cannot export, or onnxruntime cannot create a session / run the graph: not a parity
           failure (exit 2 when no cell failed)
``crash``  onnxruntime died by a signal in the isolated child that ran the cell (exit 2)
=========  ===================================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from normport.export.batch_mates import BatchMates

__all__ = ["STATUSES", "SubjectFacts"]

STATUSES = ("pass", "fail", "skipped", "error", "crash")


@dataclass
class SubjectFacts:
    """Measured facts about one subject.

    Attributes:
        name, kind: as the subject's.
        stateful_layers: module paths of the layers that keep running statistics.
        random_modules: module paths of random ops (``nn.Dropout``, ...) set to eval for the
            train-mode comparisons, so both sides are deterministic.
        modes_run: the parity modes that produced at least one pass/fail cell.
        recalibrated: a recalibration cell ran (passed or failed).
        batch_mates: the eval batch-dependence measurement; None when not measured.
        batch_mates_error: why it was not measured (the measurement raised); None otherwise.
        errors: one line per export/session error or crash (``"<mode>: <reason>"``).
    """

    name: str
    kind: str
    stateful_layers: list[str] = field(default_factory=list)
    random_modules: list[str] = field(default_factory=list)
    modes_run: list[str] = field(default_factory=list)
    recalibrated: bool = False
    batch_mates: BatchMates | None = None
    batch_mates_error: str | None = None
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)
