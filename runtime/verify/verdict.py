"""One word per subject, with its reasons: the first line of the report for that model.

======  ======================================================================================
word    when
======  ======================================================================================
FAIL    a parity cell fails: the export computes something else (how many, and the worst)
ERROR   no cell fails, but a cell could not run: cannot export, no session, or onnxruntime
        crashed (the mode and the reason)
WARN    every cell that ran passes, but eval outputs depend on batch-mates (dynamic batching
        would mix clients' requests) or a runtime skipped cells
PASS    every cell within tolerance, nothing else to say
======  ======================================================================================

The worst check is reported as its error against its tolerance,
``ratio = max |a - e| / (atol + rtol |e|)`` (1 = on the tolerance line), beside its
relative error ``max |a - e| / max(|e|, atol)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from normport.runtime.verify.facts import SubjectFacts
from normport.runtime.verify.parity import Cell

__all__ = ["WORDS", "Verdict", "Worst", "fmt", "verdict", "worst"]

WORDS = ("PASS", "WARN", "FAIL", "ERROR")
_RAN = ("pass", "fail")  # statuses whose checks compare numbers


def fmt(value: float | None) -> str:
    """Numbers as the report writes them: 0 exactly, two significant digits otherwise."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return "inf" if value > 0 else str(value)
    return f"{value:.2g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.1e}"


@dataclass(frozen=True)
class Worst:
    """The check with the largest error against its tolerance."""

    cell: str
    quantity: str
    step: int
    ratio: float
    max_rel: float
    max_abs: float

    def __str__(self) -> str:
        if not math.isfinite(self.ratio):
            return f"worst: shape or non-finite mismatch ({self.cell} {self.quantity})"
        return (
            f"worst {fmt(self.ratio)}x tolerance (rel {self.max_rel:.1e}, "
            f"{self.cell} {self.quantity})"
        )


@dataclass(frozen=True)
class Verdict:
    subject: str
    word: str
    reasons: list[str] = field(default_factory=list)
    worst: Worst | None = None

    def __str__(self) -> str:
        parts = [*self.reasons, *([str(self.worst)] if self.worst else [])]
        return f"{self.subject}: {self.word}: " + "; ".join(parts)

    def to_json(self) -> dict:
        return {
            "verdict": self.word,
            "reasons": list(self.reasons),
            "worst": None if self.worst is None else vars(self.worst).copy(),
            "line": str(self),
        }


def worst(cells: Sequence[Cell]) -> Worst | None:
    """The check with the largest ratio over the cells that compared numbers."""
    found = [(c, k) for c in cells if c.status in _RAN for k in c.checks]
    if not found:
        return None
    cell, check = max(found, key=lambda ck: ck[1].ratio)
    return Worst(cell.id, check.quantity, check.step, check.ratio, check.max_rel, check.max_abs)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _failures(failed: Sequence[Cell], total: int) -> list[str]:
    if not failed:
        return []
    return [f"{len(failed)} of {_plural(total, 'cell')} outside tolerance"]


def _errors(broken: Sequence[Cell], facts: SubjectFacts) -> list[str]:
    groups: dict[tuple[str, str, str], int] = {}
    for c in broken:
        key = (c.status, c.mode, c.reason)
        groups[key] = groups.get(key, 0) + 1
    lines = []
    for (status, mode, reason), n in groups.items():
        what = "crashed" if status == "crash" else "cannot run"
        lines.append(f"{what} in {mode} ({_plural(n, 'cell')}): {reason or 'no reason given'}")
    seen = " ".join(c.reason for c in broken)
    lines += [e for e in facts.errors if e.split(": ", 1)[-1] not in seen]
    return lines


def _batch_mates(facts: SubjectFacts) -> list[str]:
    mates = facts.batch_mates
    if mates is None or mates.independent:
        return []
    lines = []
    if mates.dependent:
        shown = ", ".join(f"{n} (rel {fmt(mates.outputs.get(n))})" for n in mates.dependent)
        lines.append(
            f"eval outputs depend on batch-mates: {shown}; "
            "dynamic batching would mix clients' requests"
        )
    if mates.unbatched:
        lines.append(
            "eval outputs without a batch axis: "
            + ", ".join(mates.unbatched)
            + "; they cannot be split per request"
        )
    return lines


def verdict(facts: SubjectFacts, cells: Sequence[Cell]) -> Verdict:
    """The subject's verdict from its cells (others in ``cells`` are ignored) and facts."""
    cells = [c for c in cells if c.subject == facts.name]
    by = {s: [c for c in cells if c.status == s] for s in ("pass", "fail", "skipped")}
    broken = [c for c in cells if c.status in ("error", "crash")]
    top = worst(cells)
    fails = _failures(by["fail"], len(cells))
    errors = _errors(broken, facts)
    warnings = _batch_mates(facts)
    if by["skipped"]:
        reasons = sorted({c.reason.removeprefix("skipped: ") for c in by["skipped"]})
        warnings.append(
            f"{_plural(len(by['skipped']), 'cell')} skipped, not passed: " + "; ".join(reasons)
        )
    if not cells and not errors:
        errors = ["no parity cell ran"]
    if fails:
        return Verdict(facts.name, "FAIL", fails + errors + warnings, top)
    if errors:
        return Verdict(facts.name, "ERROR", errors + warnings, top)
    passed = f"{_plural(len(by['pass']), 'cell')} within tolerance"
    word = "WARN" if warnings else "PASS"
    return Verdict(facts.name, word, [passed, *warnings], top)
