"""Recalibrate running statistics on onnxruntime (AdaBN-style test-time adaptation).

:func:`recalibrate` runs a normport *training* graph over unlabeled batches in onnxruntime
and returns the *inference* graph with the re-estimated statistics.  No PyTorch module is
involved: the inference graph is rewritten from the training graph
(:func:`export.train_graph.to_eval`).

>>> eval_model = runtime.recalibrate("cnn_bn.train.onnx", [batch0, batch1, batch2])

Two methods (:mod:`runtime.recalibration._methods` has the formulas):

- ``precise`` (default): every batch weighs the same, ``mean = (1/K) sum_k mean_k`` and
  ``var = (1/K) sum_k var_k n_k / (n_k - 1)``, whatever momentum the layers exported with;
  the exported statistics play no part.  This is ``torch.optim.swa_utils.update_bn`` (Wu &
  Johnson 2021's population statistics), extended to tracked InstanceNorm and SwitchableNorm's
  batch branch.  ``num_batches_tracked`` ends as update_bn leaves it: K (InstanceNorm: 0).
- ``ema``: replays training's own update, ``r <- (1 - m) r + m s_k`` (or the cumulative
  average for ``momentum=None``), from the exported statistics, or with ``reset_stats=True``
  from mean 0 / variance 1 / count 0.  From reset values the data gets only
  ``1 - (1 - m)^K`` of the weight: a :class:`RecalibrationWarning` says how much.

Every batch is checked before anything runs (empty batches, non-finite data, wrong dtype,
rank or size, naming the batch and input); nothing is returned, and the CLI writes nothing,
when a batch is refused.  Train-mode ``Dropout`` stays active during the passes (as under
``model.train()``) and becomes the identity in the returned graph.

Command line: ``python -m runtime recalibrate --help`` (:mod:`runtime.recalibration._cli`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from normport.export.train_graph import (
    NEXT_SUFFIX,
    StatefulLayer,
    per_batch_form,
    state_pairs,
    stateful_layers,
    to_eval,
)
from normport.runtime.recalibration._feeds import batch_feeds, data_inputs, initial_state
from normport.runtime.recalibration._methods import METHODS, ema_reset_warning, precise_statistics
from normport.runtime.sessions import cpu_session

__all__ = [
    "METHODS",
    "Batch",
    "RecalibrationWarning",
    "load_model",
    "main",
    "recalibrate",
    "recalibrated_statistics",
]

Batch = np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray]
Progress = Callable[[int, int, int], None]  # (batches done, batches in all, samples in it)

_RESET = {"running_mean": 0, "running_var": 1, "num_batches_tracked": 0}


class RecalibrationWarning(UserWarning):
    """The recalibrated statistics are not what the caller probably meant (ema from reset)."""


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The model itself, or loaded from a file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an ONNX model.
    """
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"train model {str(path)!r} does not exist")
    try:
        model = onnx.load(path)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ValueError(f"train model {str(path)!r} is not an ONNX model: {err}") from None
    if not model.graph.node:
        raise ValueError(f"train model {str(path)!r} is not an ONNX model (no graph nodes)")
    return model


def _stateful(model: onnx.ModelProto, name: str) -> list[StatefulLayer]:
    layers = stateful_layers(model)
    if layers:
        carried = {i for i, _ in state_pairs(model)}
        for layer in layers:
            missing = [s for s in layer.state if s not in carried]
            if missing:
                raise ValueError(
                    f"{name}: layer {layer.path!r} ({layer.call}) reads {missing}, which are not "
                    "state inputs with a '.next' output; is this a normport training export?"
                )
        return layers
    if any(i.name.endswith("running_mean") for i in model.graph.input):
        raise ValueError(
            f"{name} has running statistics but no normport training calls (exported with "
            "inline=True?); export it with inline=False to recalibrate"
        )
    raise ValueError(
        f"{name} is an inference graph (no running statistics to update); pass a training "
        "export (python -m export --mode train ...)"
    )


def _reset(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        name: np.full_like(value, next(v for s, v in _RESET.items() if name.endswith(s)))
        for name, value in state.items()
    }


def _check_finite(
    layers: Sequence[StatefulLayer], out: Mapping[str, np.ndarray], feeds: Mapping, index: int
) -> None:
    """Finite data gave a non-finite statistic: one value per channel, or an overflow."""
    for layer in layers:
        mean, var, _ = layer.state
        if np.all(np.isfinite(out[mean])) and np.all(np.isfinite(out[var])):
            continue
        shapes = ", ".join(f"{k!r} {v.shape}" for k, v in feeds.items())
        who = f"layer {layer.path!r}" if layer.path else "the top-level layer"
        if np.all(np.isfinite(out[mean])):  # var * n / (n - 1) with var = 0, n = 1: 0 * inf
            size = next(iter(feeds.values())).shape[0]
            hint = (
                "batch size 1: use batches of at least 2 samples"
                if size == 1
                else "its input has a single value per channel"
            )
            raise ValueError(
                f"batch {index} ({shapes}): {who} sees one value per channel, "
                f"so its unbiased variance var * n / (n - 1) is undefined ({hint})"
            )
        raise ValueError(
            f"batch {index} ({shapes}): {who}'s running mean became non-finite "
            "from finite data (overflow in the graph's float type?)"
        )


def recalibrated_statistics(
    train_model: onnx.ModelProto,
    batches: Iterable[Batch],
    *,
    method: str = "precise",
    reset_stats: bool = False,
    threads: int = 1,
    progress: Progress | None = None,
    name: str = "the model",
) -> tuple[dict[str, np.ndarray], int]:
    """The running statistics :func:`recalibrate` puts into the eval graph, and the batch count.

    Keyed by the training graph's state inputs (``<path>.running_mean``, ``.running_var``,
    ``.num_batches_tracked``); arguments and errors as :func:`recalibrate`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    layers = _stateful(train_model, name)
    inputs = data_inputs(train_model)
    feeds = [batch_feeds(b, inputs, f"batch {i}") for i, b in enumerate(batches)]
    if not feeds:
        raise ValueError("no batches: recalibration needs at least one batch")
    precise = method == "precise"
    if not precise and reset_stats:
        message = ema_reset_warning(layers, len(feeds))
        if message:
            warnings.warn(message, RecalibrationWarning, stacklevel=3)
    state = initial_state(train_model)
    if precise or reset_stats:
        state = _reset(state)
    sess = cpu_session(per_batch_form(train_model) if precise else train_model, threads=threads)
    names = list(state)
    sums = {n: np.zeros(v.shape, np.float64) for n, v in state.items()}
    for i, batch in enumerate(feeds):
        values = sess.run([n + NEXT_SUFFIX for n in names], {**batch, **state})
        state = dict(zip(names, values, strict=True))
        _check_finite(layers, state, batch, i)
        for n in names:
            sums[n] += state[n]
        if progress is not None:
            progress(i + 1, len(feeds), next(iter(batch.values())).shape[0])
    if precise:
        state = precise_statistics(layers, sums, state, len(feeds))
    return state, len(feeds)


def recalibrate(
    train_model_path: str | os.PathLike | onnx.ModelProto,
    batches: Iterable[Batch],
    *,
    method: str = "precise",
    reset_stats: bool = False,
    threads: int = 1,
    progress: Progress | None = None,
) -> onnx.ModelProto:
    """Re-estimate the running statistics over ``batches`` in onnxruntime; the eval model.

    Args:
        train_model_path: a normport training export (path, or the ModelProto itself).
        batches: unlabeled batches, each an array (one-input graphs), a tuple of arrays in
            graph-input order, or a mapping from graph-input name to array.  Any float data
            is cast to the graph input's float type (float64 -> float32 rounds; values
            beyond float16's range are refused); non-float data for a float input is refused.
        method: ``"precise"`` (equal weight per batch, from reset statistics) or ``"ema"``
            (training's own momentum, from the exported or reset statistics).
        reset_stats: ``ema`` only (``precise`` always starts from reset): start from mean 0,
            variance 1, count 0 instead of the exported statistics.
        threads: onnxruntime intra-op threads.
        progress: called after each batch with (batches done, batches in all, its samples).

    Returns:
        The inference ``ModelProto`` (checked with onnx's full checker), metadata ``mode=eval``,
        ``recalibration_method`` and ``recalibration_batches``.

    Raises:
        FileNotFoundError: no such model file.
        ValueError: not an ONNX model, an inference graph, an unknown method, no batches, a
            batch that does not fit the graph or holds non-finite or no data (naming the batch
            and input), or a layer that sees one value per channel (naming it).
        TypeError: data of the wrong kind for an input (naming the batch and input).

    Warns:
        RecalibrationWarning: ``ema`` from reset statistics with a momentum that leaves the
            reset values a visible share of the weight.
    """
    model = load_model(train_model_path)
    name = "the model"
    if not isinstance(train_model_path, onnx.ModelProto):
        name = repr(str(train_model_path))
    state, count = recalibrated_statistics(
        model,
        batches,
        method=method,
        reset_stats=reset_stats,
        threads=threads,
        progress=progress,
        name=name,
    )
    return to_eval(model, state, batches=count, method=method)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime recalibrate``: see :mod:`runtime.recalibration._cli`."""
    from normport.runtime.recalibration._cli import main as cli_main

    return cli_main(argv)
