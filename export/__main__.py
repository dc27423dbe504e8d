"""``python -m export``: export zoo networks into a Triton model repository.

    python -m export (--model NAME [--model NAME ...] | --all) [--mode eval|train]
                     [--opset N] [--dtype float32|float16|bfloat16] [--out DIR] [--inline]

Writes ``<out>/<name>/config.pbtxt`` and ``<out>/<name>/1/model.onnx`` per network (see
:mod:`export.repository`), a progress line per network on stderr and a summary table on
stdout.  Eval graphs are served with dynamic batching; train graphs are written with
``max_batch_size: 0`` (full shapes, no batching): their batch statistics must not mix requests
and their running-statistics inputs/outputs have no batch axis.

Exit status: 0 when every network was written, 1 when any failed (the others are still
exported), 2 for bad arguments (e.g. an unknown network name).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import torch

import export
from export.api import MODES
from export.repository import MODEL_NAME, VERSION, write_model
from models import zoo

__all__ = ["DTYPES", "NORM_OPS", "main", "norm_ops"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NORM_OPS = frozenset(
    {
        "BatchNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "RMSNormalization",
    }
)
_STANDARD_DOMAINS = ("", "ai.onnx")
_FUNCTION_DOMAIN = "normport"
_BATCH_SIZE = 4  # example batch for tracing: > 1 so that no axis-0 size gets specialised
_MAX_BATCH_SIZE = 64


@dataclass
class _Row:
    name: str
    nodes: int | None = None
    norm_ops: str = "-"
    size_kb: float | None = None
    seconds: float | None = None
    error: str | None = None


def norm_ops(model: onnx.ModelProto) -> list[str]:
    """The normalization op types of ``model``'s graph: standard ops and normport functions."""
    found = {
        node.op_type
        for node in model.graph.node
        if (node.domain in _STANDARD_DOMAINS and node.op_type in NORM_OPS)
        or node.domain == _FUNCTION_DOMAIN
    }
    return sorted(found)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export zoo networks to ONNX into a Triton Inference Server model repository.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", action="append", metavar="NAME", help=f"a zoo network: {', '.join(zoo.names())}"
    )
    which.add_argument("--all", action="store_true", help="every zoo network")
    parser.add_argument("--mode", choices=MODES, default="eval")
    parser.add_argument(
        "--opset",
        type=int,
        default=export.DEFAULT_OPSET,
        help=f"{export.MIN_OPSET} to {export.MAX_OPSET} (default {export.DEFAULT_OPSET})",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--out", default="model_repository", help="repository folder")
    parser.add_argument("--inline", action="store_true", help="inline the ONNX functions")
    return parser


def _export_one(name: str, args: argparse.Namespace) -> _Row:
    spec = zoo.get(name)
    module = spec.build()
    if args.mode == "train":
        module.train()
    start = time.perf_counter()
    model = export.to_onnx(
        module,
        spec.example_inputs(_BATCH_SIZE),
        mode=args.mode,
        opset=args.opset,
        dynamic=spec.dynamic_dims,
        dtype=DTYPES[args.dtype],
        inline=args.inline,
        input_names=spec.input_names,
        output_names=spec.output_names,
    )
    folder = write_model(
        args.out, name, model, max_batch_size=_MAX_BATCH_SIZE if args.mode == "eval" else 0
    )
    seconds = time.perf_counter() - start
    return _Row(
        name,
        nodes=len(model.graph.node),
        norm_ops=",".join(norm_ops(model)) or "-",
        size_kb=(folder / VERSION / MODEL_NAME).stat().st_size / 1024,
        seconds=seconds,
    )


def _table(rows: list[_Row], args: argparse.Namespace) -> str:
    header = ["name", "mode", "opset", "dtype", "nodes", "norm ops", "size KB", "seconds", "status"]
    cells = [header]
    for r in rows:
        cells.append(
            [
                r.name,
                args.mode,
                str(args.opset),
                args.dtype,
                "-" if r.nodes is None else str(r.nodes),
                r.norm_ops,
                "-" if r.size_kb is None else f"{r.size_kb:.1f}",
                "-" if r.seconds is None else f"{r.seconds:.2f}",
                "ok" if r.error is None else "FAILED",
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = {2, 4, 6, 7}
    lines = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argument errors raise ``SystemExit(2)``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    known = zoo.names()
    names = known if args.all else list(dict.fromkeys(args.model))
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if not export.MIN_OPSET <= args.opset <= export.MAX_OPSET:
        parser.error(f"--opset must be in [{export.MIN_OPSET}, {export.MAX_OPSET}]")
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(_export_one(name, args))
        except Exception as e:  # report, and go on with the other networks
            print(f"error: {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rows.append(_Row(name, error=str(e)))
    print(_table(rows, args))
    failed = [r.name for r in rows if r.error is not None]
    if failed:
        print(f"{len(failed)} of {len(rows)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
