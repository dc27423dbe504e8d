"""``python -m runtime verify``: the parity matrix, the divergence study, the report.

::

    python -m runtime verify --all --out reports/verify          # what `make verify` runs
    python -m runtime verify --model BatchNorm2d-momentum cnn_bn --opset 23
    python -m runtime verify --module mypkg.nets:make_model --dtype float32
    python -m runtime verify --list                              # the built-in subjects

Default opsets: 13 (the minimum: every layer a function, reductions with ``axes`` attributes,
the reference evaluator's BatchNormalization-9 workaround), 17 (LayerNormalization), 21
(GroupNorm's standard-op opset, where the default ``onnxruntime`` target keeps the function)
and 23 (RMSNormalization, the export default): every point at which a lowering may change
form.

Exit status: 0 when every parity cell passes or is skipped (a WARN verdict included); 1 when
any cell fails (the export computes something else; the failing cells are printed and listed
in ``results.json`` / ``report.md``); 2 when no cell fails but one could not run (``error``:
cannot export, no session; ``crash``: onnxruntime died), and for usage errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime
import torch

from normport import export
from normport.export import cli_help
from normport.export.about import version
from normport.runtime.verify import divergence, parity, report, subjects
from normport.runtime.verify.divergence import Divergence
from normport.runtime.verify.facts import STATUSES, SubjectFacts
from normport.runtime.verify.matrix import verify_subject
from normport.runtime.verify.parity import Cell
from normport.runtime.verify.subjects import Subject
from normport.runtime.verify.verdict import verdict

__all__ = ["DEFAULT_OPSETS", "main", "run"]

DEFAULT_OPSETS = (13, 17, 21, 23)


_EPILOG = """\
examples:
  python -m runtime verify --all                              # what `make verify` runs
  python -m runtime verify --model BatchNorm2d-momentum cnn_bn --opset 23
  python -m runtime verify --module mypkg.nets:make_model --dtype float32 --no-divergence
  python -m runtime verify --list

exit status: 0 every cell passes or is skipped; 1 a cell fails (the export computes something
else); 2 no cell fails but one could not run (error: cannot export / no session; crash:
onnxruntime died), or a usage error
"""


def _parser() -> argparse.ArgumentParser:
    parser = cli_help.parser(
        "python -m runtime verify",
        "Parity matrix (PyTorch vs onnxruntime vs the ONNX reference evaluator), "
        "train-vs-eval divergence study, report.md / results.json / plots.",
        _EPILOG,
    )
    parser.add_argument("--all", action="store_true", help="every layer and zoo network")
    parser.add_argument(
        "--model", action="extend", nargs="+", default=[], metavar="NAME",
        help="layers or zoo networks (see --list); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--module", action="extend", nargs="+", default=[], metavar="PKG.MOD:FACTORY",
        help="modules from factories (contract: runtime.verify.subjects); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--opset", type=int, nargs="+", default=list(DEFAULT_OPSETS), help="ONNX opsets"
    )
    parser.add_argument(
        "--dtype", nargs="+", choices=list(parity.DTYPES), default=list(parity.DTYPES),
        help="exported float types",
    )  # fmt: skip
    parser.add_argument(
        "--mode", nargs="+", choices=list(parity.MODES), default=list(parity.MODES),
        help="parity modes (train and recalibrate need running statistics)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="fed-back training steps (K)")
    parser.add_argument("--no-divergence", action="store_true", help="parity matrix only")
    parser.add_argument("--out", default="reports/verify", help="output folder")
    parser.add_argument("--list", action="store_true", help="list the built-in subjects")
    return parser


def _select(args: argparse.Namespace) -> list[Subject]:
    names = subjects.names() if args.all else []
    names += [n for n in args.model if n not in names]
    chosen = [subjects.get(n) for n in names]
    chosen += [subjects.from_factory(target) for target in args.module]
    if not chosen:
        raise ValueError("nothing to verify: pass --all, --model NAME or --module PKG.MOD:FACTORY")
    return chosen


def _check(args: argparse.Namespace) -> None:
    bad = [o for o in args.opset if not export.MIN_OPSET <= o <= export.MAX_OPSET]
    if bad:
        raise ValueError(f"--opset {bad}: normport exports {export.MIN_OPSET}-{export.MAX_OPSET}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    _check_out(Path(args.out))


def _check_out(out: Path) -> None:
    """``--out`` must be a folder verify can create or write into, checked before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def run(
    chosen: Sequence[Subject],
    *,
    opsets: Sequence[int] = DEFAULT_OPSETS,
    dtypes: Sequence[str] = tuple(parity.DTYPES),
    modes: Sequence[str] = parity.MODES,
    steps: int = 3,
    with_divergence: bool = True,
    out: Path = Path("reports/verify"),
    command: str = "python -m runtime verify",
    log=print,
) -> dict:
    """Verify ``chosen`` and write the report under ``out``; returns the results.json data
    (its ``subjects`` hold each subject's :class:`SubjectFacts` and verdict).  ``log`` gets the
    progress: ``[i/N] subject: <stage>`` lines, then each subject's verdict line."""
    from normport.runtime.verify import plots  # matplotlib only when drawing

    started = time.perf_counter()
    cells: list[Cell] = []
    facts: list[SubjectFacts] = []
    study_errors: list[str] = []
    for i, subject in enumerate(chosen, 1):
        t0 = time.perf_counter()
        prefix = f"[{i}/{len(chosen)}] {subject.name}"

        def progress(line: str, prefix: str = prefix) -> None:
            log(f"{prefix}: {line}")

        try:
            result = verify_subject(subject, opsets, dtypes, modes, steps, progress=progress)
        except Exception as err:  # e.g. the user's factory raised: the others still run
            study_errors.append(f"{subject.name}: {type(err).__name__}: {err}")
            log(f"{prefix}: ERROR: could not verify: {type(err).__name__}: {err}")
            continue
        cells += result.cells
        facts.append(result.facts)
        line = verdict(result.facts, result.cells)  # "<subject>: PASS: ..."
        log(f"[{i}/{len(chosen)}] {line} ({time.perf_counter() - t0:.1f} s)")
    divs: list[Divergence] = []
    not_measured: dict[str, str] = {}
    if with_divergence:
        seen: set[str] = set()
        for subject in chosen:
            try:
                divs.append(divergence.study(subject, with_steps=subject.family not in seen))
            except divergence.NotMeasured as why:
                not_measured[subject.name] = str(why)
                log(f"{subject.name}: divergence study not measured: {why}")
            except Exception as err:  # the model broke the study: reported, never a traceback
                not_measured[subject.name] = f"the study failed: {type(err).__name__}: {err}"
                study_errors.append(
                    f"{subject.name}: divergence study: {type(err).__name__}: {err}"
                )
                log(f"{subject.name}: divergence study failed: {type(err).__name__}: {err}")
            seen.add(subject.family)
    out = Path(out)
    try:
        drawn = plots.draw(out, cells, divs, facts)
    except Exception as err:  # a report without plots beats no report
        drawn = []
        study_errors.append(f"plots: {type(err).__name__}: {err}")
        log(f"plots not drawn: {type(err).__name__}: {err}")
    meta = {
        "command": command,
        "normport_version": version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opsets": list(opsets),
        "dtypes": list(dtypes),
        "modes": list(modes),
        "steps": steps,
        "divergence_not_measured": not_measured,
        "study_errors": study_errors,
        "subjects": [
            {"name": s.name, "kind": s.kind, "family": s.family, "description": s.description}
            for s in chosen
        ],
        "duration_s": time.perf_counter() - started,
    }
    return report.write(out, cells, divs, meta, drawn, facts)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # -h, or a usage error argparse already printed
        return int(exit_.code or 0)
    if args.list:
        for name in subjects.names():
            print(name)
        return 0
    try:
        _check(args)
        chosen = _select(args)
    except (KeyError, ValueError, TypeError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    data = run(
        chosen,
        opsets=args.opset,
        dtypes=args.dtype,
        modes=args.mode,
        steps=args.steps,
        with_divergence=not args.no_divergence,
        out=Path(args.out),
        command=" ".join(["python -m runtime verify", *argv]),
    )
    by = {status: 0 for status in STATUSES}
    for cell in data["parity"]:
        by[cell["status"]] += 1
    print(
        f"parity: {len(data['parity'])} cells, {by['pass']} passed, {by['fail']} failed, "
        f"{by['skipped']} skipped, {by['error']} errors, {by['crash']} crashes; "
        f"report: {Path(args.out) / 'report.md'}"
    )
    for cell in data["parity"]:
        if cell["status"] in ("fail", "error", "crash"):
            print(f"{cell['status'].upper()} {cell['id']}: {cell['reason']}", file=sys.stderr)
    for problem in data["meta"]["study_errors"]:
        print(f"ERROR {problem}", file=sys.stderr)
    return exit_status(data)


def exit_status(data: dict) -> int:
    """0 PASS or WARN; 1 FAIL (the export computes something else); 2 ERROR (a cell, the
    divergence study or the plots could not run, or no cell ran at all)."""
    word = data["summary"]["verdict"]
    if word == "FAIL":
        return 1
    if word == "ERROR" or data["meta"].get("study_errors") or not data["parity"]:
        return 2
    return 0
