"""``python -m export``: export zoo networks, or your own model, into a Triton model repository.

::

    python -m export (--model NAME [--model NAME ...] | --all) [options]
    python -m export --module PKG.MOD:FACTORY --name NAME [options]

    options: [--mode eval|train] [--opset N] [--dtype float32|float16|bfloat16] [--out DIR]
             [--max-batch-size N] [--inline] [--target onnxruntime|standard]

Writes ``<out>/<name>/config.pbtxt`` and ``<out>/<name>/1/model.onnx`` per network (see
:mod:`export.repository`), progress on stderr (``[i/N] name: exporting ...``, then the result
line) and a summary table on stdout.

``--target`` picks, where a layer has several exact forms, the one for ``onnxruntime`` (the
default: the fastest measured under its CPU provider, e.g. GroupNorm as ``normport.GroupNorm``)
or ``standard`` (the standard op wherever the opset has one); the table with its measurements
is :mod:`export.lowerings._choices`.

Names: a zoo network keeps its name in eval mode and gets ``<name>_train`` in train mode, so
that a train export never replaces the eval model that is served; ``--name`` is used as given,
and a folder that already holds a model of the other mode (its ``mode`` metadata) is refused.

Batching: before each eval export, :func:`export.batch_mates.measure` runs the module on its
example batch (>= 2 samples) once whole and once per sample.  A model whose outputs do not
depend on the batch-mates gets ``dynamic_batching`` (``--max-batch-size``, 64 unless given; 0
lists full shapes instead).  One whose outputs do (batch statistics in eval, anything reducing
over axis 0) keeps ``max_batch_size`` (a client may still send its own batch) but gets no
``dynamic_batching``: the result line says which outputs change and by how much, and
``config.pbtxt`` says it in a ``#`` comment.  Train graphs are written with
``max_batch_size: 0`` (full shapes, no batching): their batch statistics must not mix requests
and their running-statistics inputs/outputs have no batch axis.

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
exported), 2 for bad arguments, checked before any model is built: an unknown network name, a
``--name`` that is not a Triton model name, an ``--out`` that is (or lies under) a file or is
not writable, a model folder holding the other mode's model (or a model file that does not
parse), a ``--module`` that does not load or whose factory breaks the protocol; each is one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from normport import export
from normport.export import batch_mates, cli_help, factory
from normport.export._layers_table import (
    LAYERS_KEY,
    NORM_OPS,
    UNRECOGNIZED_KEY,
    align,
    layer_table,
    norm_ops,
)
from normport.export._preflight import mode_problem, out_problem
from normport.export.api import DEFAULT_TARGET, MODES, TARGETS
from normport.export.repository import MODEL_NAME, VERSION, write_model
from normport.models import zoo

__all__ = [
    "DTYPES",
    "LAYERS_KEY",
    "NORM_OPS",
    "UNRECOGNIZED_KEY",
    "layer_table",
    "main",
    "norm_ops",
    "repository_name",
    "valid_model_name",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRAIN_SUFFIX = "_train"
_BATCH_SIZE = 4  # example batch for tracing: > 1 so that no axis-0 size gets specialised
_MAX_BATCH_SIZE = 64
# A Triton model name is its folder's name and a path segment of /v2/models/<name>: keep to
# characters that need no escaping in either, and no leading '.' (hidden) or '-' (an option).
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_EXAMPLES = """\
examples:
  python -m export --all                            every zoo network, eval, into model_repository/
  python -m export --model cnn_bn --mode train      writes model_repository/cnn_bn_train/
  python -m export --model seq_bn --opset 17 --dtype float16 --out /tmp/repo
  python -m export --all --target standard          standard ops: GroupNormalization at opset >= 21
  python -m export --module mypkg.nets:make --name mynet --max-batch-size 8

names: zoo networks keep their name in eval mode and get '<name>_train' in train mode; --name
is used as given, and a folder that holds a model of the other mode is never overwritten.
batching: each eval model is run on its example batch, whole and one sample at a time; only a
model whose outputs do not depend on their batch-mates gets dynamic_batching (the others keep
max_batch_size, and the reason is printed and written as a comment in config.pbtxt).
exit status: 0 all written, 1 some export failed, 2 bad arguments (checked before exporting).
"""


def valid_model_name(name: str) -> bool:
    """Whether ``name`` can name a Triton model: 1-128 of ``[A-Za-z0-9_.-]``, not led by . or -."""
    return bool(_MODEL_NAME.fullmatch(name))


def _parser() -> argparse.ArgumentParser:
    parser = cli_help.parser(
        "python -m export",
        "Export zoo networks, or your own model, to ONNX into a Triton Inference Server model "
        "repository: <out>/<name>/config.pbtxt and <out>/<name>/1/model.onnx.",
        _EXAMPLES,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", action="append", metavar="NAME", help=f"a zoo network: {', '.join(zoo.names())}"
    )
    which.add_argument(
        "--all", action="store_true", help="every zoo network (train mode: as <name>_train)"
    )
    which.add_argument(
        "--module",
        metavar="PKG.MOD:FACTORY",
        help="your own model: a callable returning (module, example_inputs), or a module with "
        "an example_inputs(batch_size, seed) method (protocol: export.factory); needs --name",
    )
    parser.add_argument(
        "--name", help="the --module model's name in the repository (its folder), used as "
        "given in both modes: letters, digits, '_', '.', '-'"
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
        help=f"eval graphs: Triton's max_batch_size (default {_MAX_BATCH_SIZE}); dynamic "
        "batching only for models whose outputs do not depend on their batch-mates; 0 writes "
        "full shapes and no batching (train graphs: always 0)",
    )
    parser.add_argument("--inline", action="store_true", help="inline the ONNX functions")
    parser.add_argument(
        "--target",
        metavar="{" + ",".join(TARGETS) + "}",  # checked in _check: one line, exit 2
        default=DEFAULT_TARGET,
        help="where a layer has several exact forms: onnxruntime, the fastest measured under "
        "onnxruntime's CPU provider (e.g. GroupNorm as the function normport.GroupNorm); "
        "standard, the standard op wherever the opset has one",
    )
    return parser


def repository_name(name: str, mode: str) -> str:
    """A zoo network's folder: ``name`` in eval mode, ``name_train`` in train mode."""
    return name + TRAIN_SUFFIX if mode == "train" else name


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The usage errors found from the arguments alone: one line on stderr, exit status 2."""
    if args.module is not None and args.name is None:
        problem = "--module needs --name NAME (the model's folder in the repository)"
    elif args.module is None and args.name is not None:
        problem = "--name names a --module model; zoo networks keep their own names"
    elif args.name is not None and not valid_model_name(args.name):
        problem = (
            f"--name {args.name!r} is not a Triton model name: 1-128 letters, digits, '_', '.' "
            "or '-', not starting with '.' or '-'"
        )
    elif args.target not in TARGETS:
        problem = f"--target {args.target!r} is not a target: choose from {', '.join(TARGETS)}"
    elif not export.MIN_OPSET <= args.opset <= export.MAX_OPSET:
        problem = f"--opset must be in [{export.MIN_OPSET}, {export.MAX_OPSET}], got {args.opset}"
    elif args.max_batch_size is not None and args.max_batch_size < 0:
        problem = f"--max-batch-size must be >= 0, got {args.max_batch_size}"
    elif args.mode == "train" and args.max_batch_size:
        problem = "--max-batch-size: train graphs are written with 0 (no batching)"
    else:
        problem = out_problem(Path(args.out))
    if problem is not None:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")


def _targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(zoo name or None, repository name)`` per model, after the folder checks (exit 2)."""
    if args.module is not None:
        targets = [("", args.name)]
    else:
        known = zoo.names()
        names = known if args.all else list(dict.fromkeys(args.model))
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(
                f"unknown model(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
            )
        targets = [(n, repository_name(n, args.mode)) for n in names]
    renamable = args.module is not None
    for _, name in targets:
        problem = mode_problem(Path(args.out), name, args.mode, renamable=renamable)
        if problem is not None:
            parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return targets


def _max_batch_size(args: argparse.Namespace) -> int:
    if args.mode == "train":
        return 0
    return _MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size


@dataclass
class _Row:
    name: str
    nodes: int | None = None
    norm_ops: str = "-"
    size_kb: float | None = None
    seconds: float | None = None
    batching: str = "-"  # "dynamic", "off" (batch-dependent), "-" (no batching at all)
    note: str = ""  # why batching is off
    error: str | None = None


def _batching(module: nn.Module, example: tuple, args: argparse.Namespace) -> bool | str:
    """True when ``module`` may get dynamic batching, else why not (:mod:`export.batch_mates`)."""
    if _max_batch_size(args) == 0:
        return False
    if example[0].dim() == 0 or example[0].shape[0] < 2:
        return (
            "could not check whether outputs depend on their batch-mates: the example batch "
            "has fewer than 2 samples (give the factory an example batch of 2 or more)"
        )
    try:
        mates = batch_mates.measure(module, example)
    except Exception as e:  # the export itself will say what is wrong with the module
        return f"could not check whether outputs depend on their batch-mates: {e}"
    return batch_mates.reason(mates) or True


def _write(
    name: str, model: onnx.ModelProto, args: argparse.Namespace, start: float, batching: bool | str
) -> _Row:
    folder = write_model(
        args.out, name, model, max_batch_size=_max_batch_size(args), dynamic_batching=batching
    )
    return _Row(
        name,
        nodes=len(model.graph.node),
        norm_ops=",".join(norm_ops(model)) or "-",
        size_kb=(folder / VERSION / MODEL_NAME).stat().st_size / 1024,
        seconds=time.perf_counter() - start,
        batching="dynamic" if batching is True else "off" if isinstance(batching, str) else "-",
        note=batching if isinstance(batching, str) else "",
    )


def _export_one(zoo_name: str, name: str, args: argparse.Namespace) -> _Row:
    spec = zoo.get(zoo_name)
    start = time.perf_counter()
    module = spec.build().train(args.mode == "train")
    example = spec.example_inputs(_BATCH_SIZE)
    batching = _batching(module, example, args) if args.mode == "eval" else False
    model = export.to_onnx(
        module,
        example,
        mode=args.mode,
        opset=args.opset,
        dynamic=spec.dynamic_dims,
        dtype=DTYPES[args.dtype],
        inline=args.inline,
        input_names=spec.input_names,
        output_names=spec.output_names,
        target=args.target,
    )
    return _write(name, model, args, start, batching)


def _export_module(made: factory.Made, name: str, args: argparse.Namespace) -> tuple[_Row, str]:
    """Export the factory's module as ``name``; returns its row and its :func:`layer_table`."""
    start = time.perf_counter()
    module = made.module.train(args.mode == "train")
    batching = _batching(module, made.example, args) if args.mode == "eval" else False
    model = export.to_onnx(
        module,
        made.example,
        mode=args.mode,
        opset=args.opset,
        dtype=DTYPES[args.dtype],
        inline=args.inline,
        target=args.target,
    )
    layers = layer_table(model)  # before writing: a model that breaks the contract is not kept
    return _write(name, model, args, start, batching), layers


def _result_line(row: _Row) -> str:
    """The progress result: ``ok (...)`` and the batching decision."""
    batching = {
        "dynamic": "dynamic batching",
        "off": f"no dynamic batching: {row.note}",
        "-": "no batching (max_batch_size 0)",
    }[row.batching]
    return f"ok ({row.nodes} nodes, {row.size_kb:.1f} KB, {row.seconds:.2f} s); {batching}"


def _table(rows: list[_Row], args: argparse.Namespace) -> str:
    header = [
        "name", "mode", "opset", "dtype", "nodes", "norm ops", "size KB", "seconds", "batching",
        "status",
    ]  # fmt: skip
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
                r.batching,
                "ok" if r.error is None else "FAILED",
            ]
        )
    return "\n".join(align(cells, numeric=frozenset({2, 4, 6, 7})))


def _progress(i: int, n: int, name: str, what: str) -> None:
    print(f"[{i}/{n}] {name}: {what}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argument errors raise ``SystemExit(2)``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    targets = _targets(parser, args)  # every check before any model is built
    if args.module is not None:
        try:
            made = factory.build(args.module, batch_size=_BATCH_SIZE)
        except factory.FactoryError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        return _main_module(made, args)
    rows = []
    for i, (zoo_name, name) in enumerate(targets, 1):
        _progress(i, len(targets), name, "exporting ...")
        try:
            rows.append(_export_one(zoo_name, name, args))
        except Exception as e:  # report, and go on with the other networks
            print(f"error: {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rows.append(_Row(name, error=str(e)))
            continue
        _progress(i, len(targets), name, _result_line(rows[-1]))
    print(_table(rows, args))
    failed = [r.name for r in rows if r.error is not None]
    if failed:
        print(f"{len(failed)} of {len(rows)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _main_module(made: factory.Made, args: argparse.Namespace) -> int:
    _progress(1, 1, args.name, f"exporting {made.target} ...")
    try:
        row, layers = _export_module(made, args.name, args)
    except Exception as e:  # the export's own message, on one line, as for zoo networks
        print(f"error: {args.name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        print(_table([_Row(args.name, error=str(e))], args))
        return 1
    _progress(1, 1, args.name, _result_line(row))
    print(layers + "\n")
    print(_table([row], args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
