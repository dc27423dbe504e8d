"""``python -m runtime verify``: the parity matrix, the divergence study, the report.

::

    python -m runtime verify --all --out reports/verify          # what `make verify` runs
    python -m runtime verify --model BatchNorm2d-momentum --model cnn_bn --opset 23
    python -m runtime verify --module mypkg.nets:make_model --dtype float32
    python -m runtime verify --list                              # the built-in subjects

Default opsets: 13 (the minimum: every layer a function, reductions with ``axes`` attributes,
the reference evaluator's BatchNormalization-9 workaround), 17 (LayerNormalization), 21
(GroupNormalization-21) and 23 (RMSNormalization, the export default): every point at which
a lowering changes form.  Exit status: 0 when every parity cell passes or is skipped, 1 when
any fails (the failing cells are printed and listed in ``results.json`` / ``report.md``), 2
for usage errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

import onnx
import onnxruntime
import torch

import export
from runtime.verify import divergence, parity, report, subjects
from runtime.verify.divergence import Divergence
from runtime.verify.parity import Cell
from runtime.verify.subjects import Subject

__all__ = ["DEFAULT_OPSETS", "main", "run"]

DEFAULT_OPSETS = (13, 17, 21, 23)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime verify",
        description="Parity matrix (PyTorch vs onnxruntime vs the ONNX reference evaluator), "
        "train-vs-eval divergence study, report.md / results.json / plots.",
    )
    parser.add_argument("--all", action="store_true", help="every layer and zoo network")
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME", help="a layer or zoo network"
    )
    parser.add_argument(
        "--module", action="append", default=[], metavar="PKG.MOD:FACTORY",
        help="a module from a factory (contract: runtime.verify.subjects)",
    )  # fmt: skip
    parser.add_argument("--opset", type=int, nargs="+", default=list(DEFAULT_OPSETS))
    parser.add_argument(
        "--dtype", nargs="+", choices=list(parity.DTYPES), default=list(parity.DTYPES)
    )
    parser.add_argument("--mode", nargs="+", choices=list(parity.MODES), default=list(parity.MODES))
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


def _version() -> str:
    try:
        return importlib_metadata.version("normport")
    except importlib_metadata.PackageNotFoundError:  # a plain checkout
        return "0+unknown"


def _check(args: argparse.Namespace) -> None:
    bad = [o for o in args.opset if not export.MIN_OPSET <= o <= export.MAX_OPSET]
    if bad:
        raise ValueError(f"--opset {bad}: normport exports {export.MIN_OPSET}-{export.MAX_OPSET}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")


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
    """Verify ``chosen`` and write the report under ``out``; returns the results.json data."""
    from runtime.verify import plots  # matplotlib only when drawing

    started = time.perf_counter()
    cells: list[Cell] = []
    for subject in chosen:
        t0 = time.perf_counter()
        found = parity.run_subject(subject, opsets, dtypes, modes, steps)
        cells += found
        bad = sum(c.status == "fail" for c in found)
        skipped = sum(c.status == "skipped" for c in found)
        log(
            f"{subject.name:<28} {len(found):>3} cells  {bad} failed  {skipped} skipped  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    divs: list[Divergence] = []
    if with_divergence:
        seen: set[str] = set()
        for subject in chosen:
            divs.append(divergence.study(subject, with_steps=subject.family not in seen))
            seen.add(subject.family)
    out = Path(out)
    drawn = plots.draw(out, cells, divs)
    meta = {
        "command": command,
        "normport_version": _version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opsets": list(opsets),
        "dtypes": list(dtypes),
        "modes": list(modes),
        "steps": steps,
        "subjects": [
            {"name": s.name, "kind": s.kind, "family": s.family, "description": s.description}
            for s in chosen
        ],
        "duration_s": time.perf_counter() - started,
    }
    return report.write(out, cells, divs, meta, drawn)


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
    total = data["summary"]
    print(
        f"parity: {total['cells']} cells, {total['passed']} passed, {total['failed']} failed, "
        f"{total['skipped']} skipped; report: {Path(args.out) / 'report.md'}"
    )
    for cell in data["parity"]:
        if cell["status"] == "fail":
            print(f"FAIL {cell['id']}: {cell['reason']}", file=sys.stderr)
    return 1 if total["failed"] else 0
