"""``python -m runtime recalibrate``: data files in, an eval model out, one-line errors.

Every refusal is one ``error: ...`` line on stderr and exit status 2, with nothing written:
the ``--out`` path is checked before any work, the data before any statistic is computed.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from normport.export import save
from normport.export.train_graph import stateful_layers
from normport.runtime.messages import first_line
from normport.runtime.recalibration import RecalibrationWarning, load_model, recalibrate
from normport.runtime.recalibration._feeds import GraphInput, check_names, data_inputs
from normport.runtime.recalibration._methods import METHODS

__all__ = ["load_batches", "main"]


def _split(array: np.ndarray, batch_size: int | None, spec: GraphInput, where: str) -> list:
    rank = len(spec.shape)
    if batch_size is None:
        if array.ndim != rank + 1:
            hint = " (one batch? pass --batch-size to split it)" if array.ndim == rank else ""
            raise ValueError(
                f"{where}: expected batches stacked along a leading axis, rank {rank + 1} "
                f"(num_batches, {', '.join(map(str, spec.shape))}), got shape {array.shape}" + hint
            )
        return list(array)
    if array.ndim != rank:
        raise ValueError(
            f"{where}: with --batch-size expected one batch of rank {rank} "
            f"({', '.join(map(str, spec.shape))}), got shape {array.shape}"
        )
    return [array[i : i + batch_size] for i in range(0, array.shape[0], batch_size)]


def load_batches(
    path: str | os.PathLike, inputs: Sequence[GraphInput], batch_size: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Batches from a ``.npy`` or ``.npz`` file (layout in ``--help``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, an unreadable file, array names that are not the graph
            inputs, ranks that fit neither layout, or arrays that give different batch counts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    names = [spec.name for spec in inputs]
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"data file {path.name!r}: expected a .npy or .npz file")
    if path.suffix == ".npy" and len(inputs) != 1:
        raise ValueError(
            f"{path.name}: the graph has {len(inputs)} inputs {names}; a .npy holds one "
            "array: use a .npz with one array per input"
        )
    try:
        if path.suffix == ".npy":
            arrays = {names[0]: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(f"data file {path.name!r} cannot be read: {err}") from None
    check_names(arrays, names, path.name)
    split = {
        spec.name: _split(arrays[spec.name], batch_size, spec, f"{path.name}[{spec.name!r}]")
        for spec in inputs
    }
    counts = {name: len(parts) for name, parts in split.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{path.name}: arrays give different batch counts {counts}")
    return [{name: split[name][i] for name in names} for i in range(counts[names[0]])]


def _check_out(out: str) -> Path:
    """``--out`` must be a file path whose folder exists or can be created."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a directory; give the path of the .onnx file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out!r}: {str(parent)!r} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"--out {out!r}: cannot write in {str(parent)!r}")
            break
    return path


_EPILOG = """methods:
  precise  every batch weighs the same: mean of the batch means, mean of the unbiased batch
           variances, starting from reset statistics whatever the exported momentum
           (torch.optim.swa_utils.update_bn; Wu & Johnson 2021). Needs no tuning.
  ema      replay training's own update, running = (1 - m) running + m batch_stat, from the
           exported statistics (or with --reset-stats from mean 0 / variance 1, when only
           1 - (1 - m)^K of the weight reaches the data after K batches: a warning says so).

data files:
  .npy  one array: batches stacked along a new leading axis (num_batches, N, ...), or with
        --batch-size one big batch (N, ...) split into batches of that size (the last may be
        smaller); only for a graph with one data input.
  .npz  one array per graph input, named after it; each stacked, or (with --batch-size) one
        big batch; all must give the same number of batches.
  Float data of any precision is cast to the input's float type; empty batches, NaN/Inf and
  non-float data for a float input are refused, naming the batch and the array.

examples:
  python -m export --model cnn_bn --mode train --out train_repo
  python -m runtime recalibrate --train-model train_repo/cnn_bn/1/model.onnx \\
      --data target.npy --batch-size 32 --out cnn_bn.recalibrated.onnx
  python -m runtime recalibrate --train-model m.onnx --data batches.npz --method ema \\
      --out m.eval.onnx
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime recalibrate",
        description="Re-estimate running statistics on onnxruntime; writes an eval model.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train-model", required=True, help="training export (.onnx)")
    parser.add_argument("--data", required=True, help=".npy or .npz batches (below)")
    parser.add_argument("--out", required=True, help="where to write the eval model")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="precise",
        help="how to weigh the batches (below; default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="split one big batch into batches of B (default: read stacked batches)",
    )
    parser.add_argument(
        "--reset-stats",
        action="store_true",
        help="ema: start from mean 0 / variance 1 / count 0 instead of the exported "
        "statistics (default: off; precise always starts from reset)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads (default: %(default)s)"
    )
    return parser


class _Progress:
    """``batch i/N`` on stderr: one updating line on a terminal, else a line per batch."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, samples: int) -> None:
        line = f"batch {done}/{total} ({samples} samples)"
        if self.tty:
            print(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> str:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    out = _check_out(args.out)
    model = load_model(args.train_model)
    batches = load_batches(args.data, data_inputs(model), args.batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecalibrationWarning)
        result = recalibrate(
            model,
            batches,
            method=args.method,
            reset_stats=args.reset_stats,
            threads=args.threads,
            progress=_Progress(),
        )
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    save(result, out)
    layers = len(stateful_layers(model))
    samples = sum(next(iter(b.values())).shape[0] for b in batches)
    return (
        f"recalibrated {layers} layer(s) with method {args.method} over {len(batches)} "
        f"batch(es), {samples} samples; wrote {out}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # -h, or a usage error argparse already printed
        return int(exit_.code or 0)
    try:
        print(_run(args))
    except (OSError, ValueError, TypeError, DecodeError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # onnxruntime's errors derive from Exception alone
        if not type(err).__module__.startswith("onnxruntime"):
            raise
        print(f"error: onnxruntime: {first_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
