"""``python -m export``: export zoo networks, or your own model, into a Triton model repository.

::

    python -m export (--model NAME [--model NAME ...] | --all) [options]
    python -m export --module PKG.MOD:FACTORY --name NAME [options]

    options: [--mode eval|train] [--opset N] [--dtype float32|float16|bfloat16] [--out DIR]
             [--max-batch-size N] [--inline]

Writes ``<out>/<name>/config.pbtxt`` and ``<out>/<name>/1/model.onnx`` per network (see
:mod:`export.repository`), a progress line per network on stderr and a summary table on
stdout.  Eval graphs are served with dynamic batching (``--max-batch-size``, 64 unless given;
0 lists full shapes instead); train graphs are written with ``max_batch_size: 0`` (full
shapes, no batching): their batch statistics must not mix requests and their
running-statistics inputs/outputs have no batch axis.

``--module pkg.mod:factory`` exports your own model under ``--name``: the factory follows the
protocol of :mod:`export.factory` (it returns ``(module, example_inputs)``, or a module with an
``example_inputs(batch_size, seed)`` method), the module is put in ``--mode``, axis 0 of every
input is the dynamic batch axis, and the names of the graph's inputs and outputs are
:func:`export.to_onnx`'s (forward's parameter names; a dict or ``ModelOutput``'s fields).
Before the summary, a table lists every normalization layer found, what it was (class, kind,
a module / functional call / hand-written) and the node it became, then any
normalization-like module that did not become one node, with the reason
(:func:`layer_table`, from the model's ``metadata_props``).

Exit status: 0 when every network was written, 1 when any failed (the others are still
exported), 2 for bad arguments, checked before any export: an unknown network name, a
``--name`` that is not a Triton model name, an ``--out`` that is (or lies under) a file, a
``--module`` that does not load or whose factory breaks the protocol; each is one line on
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

import export
from export import factory
from export.api import MODES
from export.repository import MODEL_NAME, VERSION, write_model
from models import zoo

__all__ = [
    "DTYPES",
    "LAYERS_KEY",
    "NORM_OPS",
    "UNRECOGNIZED_KEY",
    "layer_table",
    "main",
    "norm_ops",
    "valid_model_name",
]

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
LAYERS_KEY = "normalization_layers"  # metadata_props: JSON list, one object per layer
UNRECOGNIZED_KEY = "normport.unrecognized"  # JSON list: norm-like modules not one node
_LAYER_FIELDS = ("path", "cls", "kind", "source", "node")
_UNRECOGNIZED_FIELDS = ("path", "cls", "why")
_STANDARD_DOMAINS = ("", "ai.onnx")
_FUNCTION_DOMAIN = "normport"
_BATCH_SIZE = 4  # example batch for tracing: > 1 so that no axis-0 size gets specialised
_MAX_BATCH_SIZE = 64
# A Triton model name is its folder's name and a path segment of /v2/models/<name>: keep to
# characters that need no escaping in either, and no leading '.' (hidden) or '-' (an option).
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


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


def valid_model_name(name: str) -> bool:
    """Whether ``name`` can name a Triton model: 1-128 of ``[A-Za-z0-9_.-]``, not led by . or -."""
    return bool(_MODEL_NAME.fullmatch(name))


def _metadata_list(model: onnx.ModelProto, key: str, fields: tuple[str, ...]) -> list[dict]:
    """``metadata_props[key]`` as a JSON list of objects with string ``fields``; [] if absent."""
    raw = next((p.value for p in model.metadata_props if p.key == key), None)
    if raw is None or not raw.strip():
        return []
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata_props[{key!r}] is not JSON ({err}): {raw[:80]!r}") from None
    if not isinstance(entries, list):
        raise ValueError(f"metadata_props[{key!r}] must be a JSON list, got {raw[:80]!r}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in fields):
            raise ValueError(
                f"metadata_props[{key!r}][{i}] must be an object with string fields "
                f"{', '.join(fields)}; got {json.dumps(entry)[:120]}"
            )
    return entries


def _align(rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> list[str]:
    """``rows[0]`` is the header; a rule of dashes goes under it; columns padded to fit."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def layer_table(model: onnx.ModelProto) -> str:
    """What became of ``model``'s normalization layers, from its ``metadata_props``.

    :data:`LAYERS_KEY` holds one object per layer (``path``, ``cls``, ``kind``, ``source``:
    ``module`` / ``functional`` / ``handwritten``, and ``node``, the op or function it became);
    :data:`UNRECOGNIZED_KEY` (optional) one per normalization-like module that did not become
    one node (``path``, ``cls``, ``why``).  Returns aligned tables::

        normalization layers: 2
        path  class        kind       source  node
        ----  -----------  ---------  ------  ------------------
        1     BatchNorm2d  batchnorm  module  BatchNormalization
        ...

    Raises:
        ValueError: :data:`LAYERS_KEY` is missing (not a normport export), or either value is
            not a JSON list of objects with those string fields (naming the key and entry).
    """
    if not any(p.key == LAYERS_KEY for p in model.metadata_props):
        raise ValueError(
            f"the model has no metadata_props[{LAYERS_KEY!r}]: not written by export.to_onnx"
        )
    layers = _metadata_list(model, LAYERS_KEY, _LAYER_FIELDS)
    partly = _metadata_list(model, UNRECOGNIZED_KEY, _UNRECOGNIZED_FIELDS)
    lines = [f"normalization layers: {len(layers) or 'none found'}"]
    if layers:
        rows = [
            [e["path"] or "<root>", e["cls"], e["kind"], e["source"], e["node"]] for e in layers
        ]
        lines += _align([["path", "class", "kind", "source", "node"], *rows])
    if partly:
        lines.append(f"normalization-like, not one node: {len(partly)}")
        rows = [[e["path"] or "<root>", e["cls"], e["why"]] for e in partly]
        lines += _align([["path", "class", "why"], *rows])
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) of options that have none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export zoo networks, or your own model, to ONNX into a Triton Inference "
        "Server model repository: <out>/<name>/config.pbtxt and <out>/<name>/1/model.onnx.",
        formatter_class=_HelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", action="append", metavar="NAME", help=f"a zoo network: {', '.join(zoo.names())}"
    )
    which.add_argument("--all", action="store_true", help="every zoo network")
    which.add_argument(
        "--module",
        metavar="PKG.MOD:FACTORY",
        help="your own model: a callable returning (module, example_inputs), or a module with "
        "an example_inputs(batch_size, seed) method (protocol: export.factory); needs --name",
    )
    parser.add_argument(
        "--name", help="the --module model's name in the repository (its folder): "
        "letters, digits, '_', '.', '-'"
    )  # fmt: skip
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="eval",
        help="eval: running statistics; train: batch statistics, updated running statistics "
        "as extra outputs",
    )
    parser.add_argument(
        "--opset",
        type=int,
        metavar="N",
        default=export.DEFAULT_OPSET,
        help=f"{export.MIN_OPSET} to {export.MAX_OPSET}",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="weights and activations (statistics stay float32)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default="model_repository", help="repository folder"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help=f"eval graphs: Triton's max_batch_size (default {_MAX_BATCH_SIZE}); 0 writes full "
        "shapes and no dynamic batching (train graphs: always 0)",
    )
    parser.add_argument("--inline", action="store_true", help="inline the ONNX functions")
    return parser


def _out_problem(out: Path) -> str | None:
    """Why ``out`` cannot be the repository folder, or None."""
    if out.exists():
        if not out.is_dir():
            return f"--out {str(out)!r} is a file, expected a folder"
        return None if os.access(out, os.W_OK) else f"--out {str(out)!r} is not writable"
    existing = next(p for p in out.absolute().parents if p.exists())  # "/" always exists
    if not existing.is_dir():
        return f"--out {str(out)!r}: {str(existing)!r} is a file, expected a folder"
    if not os.access(existing, os.W_OK):
        return f"--out {str(out)!r}: cannot create it in {str(existing)!r} (not writable)"
    return None


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The usage errors found after parsing: one line on stderr, exit status 2."""
    if args.module is not None and args.name is None:
        problem = "--module needs --name NAME (the model's folder in the repository)"
    elif args.module is None and args.name is not None:
        problem = "--name names a --module model; zoo networks keep their own names"
    elif args.name is not None and not valid_model_name(args.name):
        problem = (
            f"--name {args.name!r} is not a Triton model name: 1-128 letters, digits, '_', '.' "
            "or '-', not starting with '.' or '-'"
        )
    elif not export.MIN_OPSET <= args.opset <= export.MAX_OPSET:
        problem = f"--opset must be in [{export.MIN_OPSET}, {export.MAX_OPSET}], got {args.opset}"
    elif args.max_batch_size is not None and args.max_batch_size < 0:
        problem = f"--max-batch-size must be >= 0, got {args.max_batch_size}"
    elif args.mode == "train" and args.max_batch_size:
        problem = "--max-batch-size: train graphs are written with 0 (no batching)"
    else:
        problem = _out_problem(Path(args.out))
    if problem is not None:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")


def _max_batch_size(args: argparse.Namespace) -> int:
    if args.mode == "train":
        return 0
    return _MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size


def _write(name: str, model: onnx.ModelProto, args: argparse.Namespace, start: float) -> _Row:
    folder = write_model(args.out, name, model, max_batch_size=_max_batch_size(args))
    return _Row(
        name,
        nodes=len(model.graph.node),
        norm_ops=",".join(norm_ops(model)) or "-",
        size_kb=(folder / VERSION / MODEL_NAME).stat().st_size / 1024,
        seconds=time.perf_counter() - start,
    )


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
    return _write(name, model, args, start)


def _export_module(made: factory.Made, name: str, args: argparse.Namespace) -> tuple[_Row, str]:
    """Export the factory's module as ``name``; returns its row and its :func:`layer_table`."""
    module = made.module.train(args.mode == "train")
    start = time.perf_counter()
    model = export.to_onnx(
        module,
        made.example,
        mode=args.mode,
        opset=args.opset,
        dtype=DTYPES[args.dtype],
        inline=args.inline,
    )
    layers = layer_table(model)  # before writing: a model that breaks the contract is not kept
    return _write(name, model, args, start), layers


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
    return "\n".join(_align(cells, numeric=frozenset({2, 4, 6, 7})))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argument errors raise ``SystemExit(2)``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.module is not None:
        try:
            made = factory.build(args.module, batch_size=_BATCH_SIZE)
        except factory.FactoryError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        return _main_module(made, args)
    known = zoo.names()
    names = known if args.all else list(dict.fromkeys(args.model))
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
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


def _main_module(made: factory.Made, args: argparse.Namespace) -> int:
    print(f"[1/1] {args.name} ({made.target}) ...", file=sys.stderr, flush=True)
    try:
        row, layers = _export_module(made, args.name, args)
    except Exception as e:  # the export's own message, on one line, as for zoo networks
        print(f"error: {args.name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        print(_table([_Row(args.name, error=str(e))], args))
        return 1
    print(layers + "\n")
    print(_table([row], args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
