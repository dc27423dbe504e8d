"""``results.json`` (everything, machine-readable) and ``report.md`` (verdicts, tables, reading).

``results.json``::

    {"schema": 1,
     "meta": {versions, opsets, dtypes, modes, steps, subjects, duration_s, ...},
     "tolerances": [{"dtype", "scope", "atol", "rtol"}],
     "summary": {"verdict", "cells", "passed", "failed", "skipped", "errors", "crashes",
                 "failed_cells": [id], "skipped_cells": [id], "error_cells": [id]},
     "subjects": [{SubjectFacts fields, "verdict": "PASS|WARN|FAIL|ERROR", "reasons": [...],
                   "worst": {"cell", "quantity", "step", "ratio", "max_rel", "max_abs"},
                   "line": "<the verdict line>", "reading": [...]}],
     "parity": [{"id": "<subject>/<mode>/<runtime>/<dtype>/opset<N>", "status", "reason",
                 "max_abs", "max_rel", "worst", "atol", "rtol",
                 "batches": [{"batch_size", "seed", "alt"}],   # how the inputs were drawn
                 "checks": [{"quantity", "step", "max_abs", "max_rel", "ratio", "ok"}]}],
     "divergence": [{"subject", "family", "output_scale", "batch_curve", "mates_train",
                     "mates_eval", "depends_on_batch", "steps": [...]}],
     "reading": {"parity": [...], ..., "subjects": {name: [...]}},
     "plots": ["plots/....png"]}

``error_cells`` holds the cells that could not run (``error``: cannot export, no session;
``crash``: onnxruntime died by a signal); they are counted apart from parity failures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from normport.runtime.verify import tables
from normport.runtime.verify.divergence import Divergence
from normport.runtime.verify.facts import SubjectFacts
from normport.runtime.verify.parity import Cell
from normport.runtime.verify.reading import reading, subject_reading
from normport.runtime.verify.tolerances import TOLERANCES
from normport.runtime.verify.verdict import Verdict, verdict

__all__ = ["summary", "write"]

_SECTIONS = {
    "parity": "Parity",
    "recalibration": "Recalibration",
    "layers": "Layers: batch dependence",
    "steps": "Layers: running statistics over training steps",
    "networks": "Networks",
}
_SEVERITY = {"PASS": 0, "WARN": 1, "ERROR": 2, "FAIL": 3}  # a failure outranks an error


def summary(cells: Sequence[Cell], verdicts: Sequence[Verdict] = ()) -> dict:
    by = {s: [c.id for c in cells if c.status == s] for s in ("pass", "fail", "skipped")}
    broken = [c.id for c in cells if c.status in ("error", "crash")]
    return {
        "verdict": overall(cells, verdicts),
        "cells": len(cells),
        "passed": len(by["pass"]),
        "failed": len(by["fail"]),
        "skipped": len(by["skipped"]),
        "errors": sum(c.status == "error" for c in cells),
        "crashes": sum(c.status == "crash" for c in cells),
        "failed_cells": by["fail"],
        "skipped_cells": by["skipped"],
        "error_cells": broken,
    }


def overall(cells: Sequence[Cell], verdicts: Sequence[Verdict]) -> str:
    """The worst subject verdict (and never better than the cells say)."""
    words = [v.word for v in verdicts]
    if any(c.status == "fail" for c in cells):
        words.append("FAIL")
    if any(c.status in ("error", "crash") for c in cells):
        words.append("ERROR")
    return max(words, key=_SEVERITY.__getitem__, default="PASS")


def _derived(cells: Sequence[Cell], facts: Sequence[SubjectFacts]) -> list[SubjectFacts]:
    """Facts for subjects the caller gave none for: only what the cells show."""
    known = {f.name for f in facts}
    found: dict[str, SubjectFacts] = {}
    for c in cells:
        if c.subject not in known:
            f = found.setdefault(c.subject, SubjectFacts(c.subject, c.kind))
            if c.status in ("pass", "fail") and c.mode not in f.modes_run:
                f.modes_run.append(c.mode)
            f.recalibrated |= c.mode == "recalibrate" and c.status in ("pass", "fail")
    return list(found.values())


def _subjects(cells, divergences, facts) -> list[dict]:
    divs = {d.subject: d for d in divergences}
    given = {f.name for f in facts}
    entries = []
    for f in [*facts, *_derived(cells, facts)]:
        v = verdict(f, cells)
        # Without the caller's facts, only what the cells and the study show: no claim about
        # the model's layers or random modules.
        sentences = subject_reading(f, cells, divs.get(f.name), claims=f.name in given)
        entries.append({**f.to_json(), **v.to_json(), "reading": sentences})
    return entries


def _models(data: dict, cells: Sequence[Cell]) -> list[str]:
    lines = ["## Models", ""]
    for s in data["subjects"]:
        mine = [c for c in cells if c.subject == s["name"]]
        lines += [f"### {s['name']}", "", f"**{s['line']}**", ""]
        lines += [f"- {sentence}" for sentence in s["reading"]] + [""]
        if mine:
            lines += [*tables.parity_table(mine), ""]
    return lines


def _cell_lists(cells: Sequence[Cell]) -> list[str]:
    lines = []
    for statuses, title in (
        (("fail",), "Failing cells"),
        (("error", "crash"), "Cells that could not run (errors and crashes, not parity failures)"),
        (("skipped",), "Skipped cells (not passes)"),
    ):
        chosen = [c for c in cells if c.status in statuses]
        if chosen:
            lines += [f"## {title}", ""]
            lines += [f"- `{c.id}` ({tables.LABELS[c.status]}): {c.reason}" for c in chosen]
            lines += [""]
    return lines


def _markdown(data: dict, cells: Sequence[Cell], divs: Sequence[Divergence]) -> str:
    meta, total = data["meta"], data["summary"]
    lines = [
        "# normport verification report",
        "",
        f"`{meta['command']}`: torch {meta['torch']}, onnx {meta['onnx']}, onnxruntime "
        f"{meta['onnxruntime']}; opsets {', '.join(map(str, meta['opsets']))}; "
        f"{meta['steps']} fed-back training steps; {meta['duration_s']:.0f} s.",
        "",
        f"**{total['verdict']}: {total['passed']} of {total['cells']} parity cells pass, "
        f"{total['failed']} fail, {total['errors']} errors, {total['crashes']} crashes, "
        f"{total['skipped']} skipped.**",
        "",
    ]
    lines += [f"- {s['line']}" for s in data["subjects"]] + [""]
    problems = meta.get("study_errors") or []
    if problems:
        lines += ["**Could not run** (exit status 2):", ""]
        lines += [f"- ERROR {p}" for p in problems] + [""]
    lines += _models(data, cells)
    lines += ["## What the numbers say", ""]
    for key, title in _SECTIONS.items():
        if data["reading"].get(key):
            lines += [f"**{title}.**", ""] + [f"- {s}" for s in data["reading"][key]] + [""]
    lines += _cell_lists(cells)
    if cells:
        lines += [
            "## Parity matrix",
            "",
            "Pass when |actual - expected| <= atol + rtol |expected| everywhere "
            "(integers: equal). float16 rows compare with float64 PyTorch on the "
            "half-rounded input and parameters.",
            "",
            "| dtype | scope | atol | rtol |",
            "|---|---|---|---|",
        ]
        lines += [f"| {t['dtype']} | {t['scope']} | {t['atol']:g} | {t['rtol']:g} |"
                  for t in data["tolerances"]]  # fmt: skip
        lines += ["", *tables.matrix(cells, data["plots"])]
    lines += tables.divergence(divs, data["plots"])
    skipped = meta.get("divergence_not_measured") or {}
    if skipped:
        lines += ["Not in the divergence study:", ""]
        lines += [f"- {name}: {why}." for name, why in skipped.items()]
        lines.append("")
    lines += ["## Subjects", "", "| name | kind | description |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['kind']} | `{s['description']}` |" for s in meta["subjects"]]
    return "\n".join(lines) + "\n"


def _finite(value):
    """Standard JSON: a non-finite float (a shape mismatch, a NaN output) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write(
    out: Path,
    cells: Sequence[Cell],
    divergences: Sequence[Divergence],
    meta: dict,
    plots: Sequence[str],
    facts: Sequence[SubjectFacts] = (),
) -> dict:
    """Write ``results.json`` and ``report.md`` under ``out``; returns the JSON data.

    ``facts``: one per subject (what the model has and what ran); a subject without facts
    gets a verdict and the sentences its cells alone support.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subjects = _subjects(cells, divergences, facts)
    verdicts = [Verdict(s["name"], s["verdict"]) for s in subjects]
    data = {
        "schema": 1,
        "meta": meta,
        "tolerances": [
            {"dtype": d, "scope": s, "atol": t.atol, "rtol": t.rtol}
            for (d, s), t in TOLERANCES.items()
        ],
        "summary": summary(cells, verdicts),
        "subjects": subjects,
        "parity": [c.to_json() for c in cells],
        "divergence": [d.to_json() for d in divergences],
        "reading": reading(cells, divergences, facts),
        "plots": list(plots),
    }
    (out / "results.json").write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(_markdown(data, cells, divergences))
    return data
