"""Recalibrate running statistics on onnxruntime (AdaBN-style test-time adaptation).

:func:`recalibrate` runs a normport *training* graph over unlabeled batches in onnxruntime,
feeding each step's ``<path>.running_*.next`` outputs back as the next step's inputs, and
returns the *inference* graph with the statistics it ended with: the same model that PyTorch
would give by running the batches through ``model.train()`` under ``torch.no_grad()`` and then
``export.to_onnx(model.eval(), ..., mode="eval")``.  No PyTorch module is involved: the
inference graph is rewritten from the training graph (:mod:`runtime._recalibration_rewrite`).

>>> eval_model = runtime.recalibrate("cnn_bn.train.onnx", [batch0, batch1, batch2])

Each running statistic follows its layer's own rule, as in PyTorch: momentum ``m`` gives
``(1 - m) * running + m * batch_stat``, ``momentum=None`` the cumulative average, and
InstanceNorm with ``momentum=None`` keeps its statistics.  ``reset_stats=True`` starts from
``running_mean = 0``, ``running_var = 1``, ``num_batches_tracked = 0`` (PyTorch's
``reset_running_stats()``), which with the cumulative average gives the target data's plain
average (AdaBN).  Train-mode ``Dropout`` stays active during the passes (as under
``model.train()``) and becomes the identity in the returned graph.

Command line (``python -m runtime recalibrate``)::

    --train-model PATH   a training export (export.to_onnx(..., mode="train"), not inlined)
    --data FILE          .npy: one array, the batches stacked along a new leading axis
                         (num_batches, N, ...), or with --batch-size one big batch (N, ...)
                         split into batches of that size (the last one may be smaller);
                         only for a graph with one data input.
                         .npz: one array per graph input, named after it, each stacked or
                         (with --batch-size) one big batch, all giving the same batch count.
    --batch-size B       split one big batch instead of reading stacked batches
    --reset-stats        start from mean 0 / variance 1 / count 0
    --out PATH           where to write the inference model
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from export import save
from runtime._recalibration_feeds import (
    GraphInput,
    batch_feeds,
    data_inputs,
    initial_state,
    session,
    state_pairs,
)
from runtime._recalibration_rewrite import to_eval

__all__ = ["Batch", "load_batches", "main", "recalibrate"]

Batch = np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray]


def _load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"train model {str(path)!r} does not exist")
    return onnx.load(path)


def _reset(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = {"running_mean": 0, "running_var": 1, "num_batches_tracked": 0}
    reset = {}
    for name, value in state.items():
        stat = next(s for s in values if name == s or name.endswith("." + s))
        reset[name] = np.full_like(value, values[stat])
    return reset


def recalibrate(
    train_model_path: str | os.PathLike | onnx.ModelProto,
    batches: Iterable[Batch],
    *,
    reset_stats: bool = False,
    threads: int = 1,
) -> onnx.ModelProto:
    """Run the training graph over ``batches`` in onnxruntime; the eval model it ends with.

    Args:
        train_model_path: a normport training export (path, or the ModelProto itself).
        batches: unlabeled batches, each an array (one-input graphs), a tuple of arrays in
            graph-input order, or a mapping from graph-input name to array.  Floating arrays
            are cast to the graph's float type (float16 graphs take float32 data).
        reset_stats: start from reset statistics instead of the exported ones.
        threads: onnxruntime intra-op threads.

    Returns:
        The inference ``ModelProto`` (checked with onnx's full checker), metadata ``mode=eval``
        and ``recalibration_batches``.

    Raises:
        FileNotFoundError: no such model file.
        ValueError: not a training graph with running statistics, no batches, a batch that
            does not fit the graph (naming the batch and input), or statistics that became
            NaN (e.g. a batch with one value per channel).
    """
    model = _load_model(train_model_path)
    pairs = state_pairs(model)
    if not pairs:
        raise ValueError(
            "the model carries no running statistics (no '<path>.running_mean' input with a "
            "'.next' output): pass a training export of a model with BatchNorm, tracked "
            "InstanceNorm or SwitchableNorm layers"
        )
    inputs = data_inputs(model)
    state = initial_state(model)
    if reset_stats:
        state = _reset(state)
    sess = session(model, threads=threads)
    fetch = [out for _, out in pairs]
    count = 0
    for i, batch in enumerate(batches):
        feeds = batch_feeds(batch, inputs, f"batch {i}")
        values = sess.run(fetch, {**feeds, **state})
        bad = [out for out, v in zip(fetch, values, strict=True) if not np.all(np.isfinite(v))]
        if bad:
            shapes = {k: v.shape for k, v in feeds.items()}
            raise ValueError(
                f"batch {i} {shapes}: {bad[0]} became non-finite (a batch with one value per "
                "channel has no unbiased variance; use batches of at least 2 samples)"
            )
        state = {name: v for (name, _), v in zip(pairs, values, strict=True)}
        count += 1
    if count == 0:
        raise ValueError("no batches: recalibration needs at least one batch")
    return to_eval(model, state, batches=count)


# -- data files --------------------------------------------------------------------------------


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
    """Batches from a ``.npy`` or ``.npz`` file (layout in this module's docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, array names that are not the graph inputs, ranks that
            fit neither layout, or arrays that give different batch counts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    names = [spec.name for spec in inputs]
    if path.suffix == ".npy":
        if len(inputs) != 1:
            raise ValueError(
                f"{path.name}: the graph has {len(inputs)} inputs {names}; a .npy holds one "
                "array: use a .npz with one array per input"
            )
        arrays = {names[0]: np.load(path, allow_pickle=False)}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        unknown = sorted(set(arrays) - set(names))
        missing = [n for n in names if n not in arrays]
        if unknown or missing:
            raise ValueError(
                f"{path.name}: arrays must be named after the graph inputs {names}; "
                f"unknown {unknown}, missing {missing}"
            )
    else:
        raise ValueError(f"data file {path.name!r}: expected a .npy or .npz file")
    split = {
        spec.name: _split(arrays[spec.name], batch_size, spec, f"{path.name}[{spec.name!r}]")
        for spec in inputs
    }
    counts = {name: len(parts) for name, parts in split.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{path.name}: arrays give different batch counts {counts}")
    return [{name: split[name][i] for name in names} for i in range(counts[names[0]])]


# -- command line ------------------------------------------------------------------------------


_DATA_HELP = """data files:
  .npy  one array: batches stacked along a new leading axis (num_batches, N, ...), or with
        --batch-size one big batch (N, ...) split into batches of that size (the last may be
        smaller); only for a graph with one data input.
  .npz  one array per graph input, named after it; each stacked, or (with --batch-size) one
        big batch; all must give the same number of batches.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime recalibrate",
        description="Recalibrate running statistics on onnxruntime; writes an eval model.",
        epilog=_DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train-model", required=True, help="training export (.onnx)")
    parser.add_argument("--data", required=True, help=".npy or .npz batches (below)")
    parser.add_argument("--batch-size", type=int, default=None, help="split one big batch")
    parser.add_argument("--reset-stats", action="store_true", help="start from mean 0, var 1")
    parser.add_argument("--out", required=True, help="where to write the eval model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # -h, or a usage error argparse already printed
        return int(exit_.code or 0)
    try:
        model = _load_model(args.train_model)
        batches = load_batches(args.data, data_inputs(model), args.batch_size)
        result = recalibrate(model, batches, reset_stats=args.reset_stats)
    except (OSError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = save(result, args.out)
    layers = len(state_pairs(model)) // 3
    samples = sum(next(iter(b.values())).shape[0] for b in batches)
    print(
        f"recalibrated {layers} layer(s) over {len(batches)} batch(es), {samples} samples; "
        f"wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
