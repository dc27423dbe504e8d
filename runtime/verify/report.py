"""``results.json`` (everything, machine-readable) and ``report.md`` (tables and the reading).

``results.json``::

    {"schema": 1,
     "meta": {versions, opsets, dtypes, modes, steps, subjects, duration_s, ...},
     "tolerances": [{"dtype", "scope", "atol", "rtol"}],
     "summary": {"cells", "passed", "failed", "skipped", "failed_cells": [id], ...},
     "parity": [{"id": "<subject>/<mode>/<runtime>/<dtype>/opset<N>", "status", "reason",
                 "max_abs", "max_rel", "worst", "atol", "rtol",
                 "batches": [{"batch_size", "seed", "alt"}],   # how the inputs were drawn
                 "checks": [{"quantity", "step", "max_abs", "max_rel", "ratio", "ok"}]}],
     "divergence": [{"subject", "family", "output_scale", "batch_curve", "mates_train",
                     "mates_eval", "depends_on_batch", "steps": [...]}],
     "reading": {"parity": [...], ...},
     "plots": ["plots/....png"]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from runtime.verify.divergence import Divergence
from runtime.verify.parity import Cell
from runtime.verify.reading import fmt, reading
from runtime.verify.tolerances import TOLERANCES

__all__ = ["summary", "to_json", "write"]

_SECTIONS = {
    "parity": "Parity",
    "recalibration": "Recalibration",
    "layers": "Layers: batch dependence",
    "steps": "Layers: running statistics over training steps",
    "networks": "Networks",
}


def summary(cells: Sequence[Cell]) -> dict:
    by = {s: [c.id for c in cells if c.status == s] for s in ("pass", "fail", "skipped")}
    return {
        "cells": len(cells),
        "passed": len(by["pass"]),
        "failed": len(by["fail"]),
        "skipped": len(by["skipped"]),
        "failed_cells": by["fail"],
        "skipped_cells": by["skipped"],
    }


def to_json(
    cells: Sequence[Cell], divergences: Sequence[Divergence], meta: dict, plots: Sequence[str]
) -> dict:
    return {
        "schema": 1,
        "meta": meta,
        "tolerances": [
            {"dtype": d, "scope": s, "atol": t.atol, "rtol": t.rtol}
            for (d, s), t in TOLERANCES.items()
        ],
        "summary": summary(cells),
        "parity": [c.to_json() for c in cells],
        "divergence": [d.to_json() for d in divergences],
        "reading": reading(cells, divergences),
        "plots": list(plots),
    }


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return ""
    if cell.status == "skipped":
        return "skipped"
    worst = cell.worst
    if cell.status == "fail":
        where = f" {worst.quantity}" if worst is not None else ""
        return f"**FAIL** {fmt(worst.max_abs) if worst else 'error'}{where}"
    return f"ok {fmt(worst.max_abs)}" if worst is not None else "ok"


def _image(plots: Sequence[str], path: str) -> list[str]:
    return [f"![{Path(path).stem}]({path})"] if path in plots else []


def _matrix(cells: Sequence[Cell], plots: Sequence[str]) -> list[str]:
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
            "Max absolute error per cell (worst value over outputs, statistics and steps).",
            "",
            "| subject | mode | runtime | " + " | ".join(f"opset {o}" for o in opsets) + " |",
            "|---|---|---|" + "---|" * len(opsets),
        ]
        for (subject, mode, runtime), by_opset in rows.items():
            texts = " | ".join(_cell_text(by_opset.get(o)) for o in opsets)
            lines.append(f"| {subject} | {mode} | {runtime} | {texts} |")
        lines += ["", *_image(plots, f"plots/parity_{dtype}.png"), ""]
    return lines


def _divergence(divs: Sequence[Divergence], plots: Sequence[str]) -> list[str]:
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
        "| subject | family | train-mode change | eval-mode change | output scale "
        "| depends on batch |",
        "|---|---|---|---|---|---|",
    ]
    for d in divs:
        lines.append(
            f"| {d.subject} | {d.family} | {fmt(d.mates_train)} | {fmt(d.mates_eval)} | "
            f"{fmt(d.output_scale)} | {'yes' if d.depends_on_batch else 'no'} |"
        )
    lines += ["", *_image(plots, "plots/batch_mates.png"), ""]
    for kind, title in (("layer", "Layers"), ("network", "Networks")):
        group = [d for d in divs if (d.kind == "layer") == (kind == "layer")]
        if not group:
            continue
        sizes = [p.batch_size for p in group[0].batch_curve]
        lines += [
            f"### {title}: mean |train - eval| by batch size",
            "",
            "| subject | " + " | ".join(f"B={s}" for s in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for d in group:
            values = " | ".join(fmt(p.mean_abs) for p in d.batch_curve)
            lines.append(f"| {d.subject} | {values} |")
        plot = "divergence_batch_size" if kind == "layer" else "divergence_networks"
        lines += ["", *_image(plots, f"plots/{plot}.png"), ""]
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
        lines += ["", *_image(plots, "plots/divergence_steps.png"), ""]
    return lines


def _markdown(data: dict, cells: Sequence[Cell], divs: Sequence[Divergence]) -> str:
    meta, total = data["meta"], data["summary"]
    verdict = "PASS" if total["failed"] == 0 else "FAIL"
    lines = [
        "# normport verification report",
        "",
        f"`{meta['command']}`: torch {meta['torch']}, onnx {meta['onnx']}, onnxruntime "
        f"{meta['onnxruntime']}; opsets {', '.join(map(str, meta['opsets']))}; "
        f"{meta['steps']} fed-back training steps; {meta['duration_s']:.0f} s.",
        "",
        f"**{verdict}: {total['passed']} of {total['cells']} parity cells pass, "
        f"{total['failed']} fail, {total['skipped']} skipped.**",
        "",
        "## What the numbers say",
        "",
    ]
    for key, title in _SECTIONS.items():
        if data["reading"].get(key):
            lines += [f"**{title}.**", ""] + [f"- {s}" for s in data["reading"][key]] + [""]
    if total["failed"]:
        lines += ["## Failing cells", ""]
        lines += [f"- `{c.id}`: {c.reason}" for c in cells if c.status == "fail"] + [""]
    if total["skipped"]:
        lines += ["## Skipped cells (not passes)", ""]
        lines += [f"- `{c.id}`: {c.reason}" for c in cells if c.status == "skipped"] + [""]
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
        lines += ["", *_matrix(cells, data["plots"])]
    lines += _divergence(divs, data["plots"])
    lines += [
        "## Subjects",
        "",
        "| name | kind | description |",
        "|---|---|---|",
    ]
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
) -> dict:
    """Write ``results.json`` and ``report.md`` under ``out``; returns the JSON data."""
    out.mkdir(parents=True, exist_ok=True)
    data = to_json(cells, divergences, meta, plots)
    (out / "results.json").write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(_markdown(data, cells, divergences))
    return data
