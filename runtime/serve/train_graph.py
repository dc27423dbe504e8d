"""Refuse training graphs: what they are, why they cannot be served, what to do instead.

A training export (``python -m export --mode train``; the contract is :mod:`export.train_graph`)
computes batch statistics and returns the updated running statistics: for each stateful layer
at ``<path>``, the inputs
``<path>.running_mean`` / ``.running_var`` / ``.num_batches_tracked`` and the outputs
``<path>.running_mean.next`` / ...; its ``metadata_props`` say ``mode=train``.  Served, each
response would carry statistics nobody feeds back, and requests batched together would
normalize each other.  The reason the server gives is whole (one line, a few hundred
characters: at most :data:`SHOWN` state names, each clipped), so the repository index and the
load error can show it without cutting it off.
"""

from __future__ import annotations

import onnx

from normport.export.train_graph import MODE_KEY, state_pairs

__all__ = ["SHOWN", "TrainGraphError", "check_not_train", "train_graph_reason"]

SHOWN = 3  # state names quoted in the reason; the count says how many there are
_MAX_NAME = 80


class TrainGraphError(ValueError):
    """The model is a training graph; the message is the full, bounded reason."""


def _clip(name: str) -> str:
    return name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + "..."


def _names(names: list[str]) -> str:
    shown = ", ".join(_clip(n) for n in names[:SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")


def train_graph_reason(model: onnx.ModelProto) -> str | None:
    """Why ``model`` cannot be served as a training graph, or None when it is not one.

    A training graph: ``metadata_props`` ``mode`` is ``train``, or a graph output
    ``<path>.<stat>.next`` pairs with a graph input ``<path>.<stat>`` (a running statistic).
    """
    mode = next((p.value for p in model.metadata_props if p.key == MODE_KEY), None)
    pairs = state_pairs(model)
    if mode != "train" and not pairs:
        return None
    found = ["metadata mode=train"] if mode == "train" else []
    if pairs:
        found.append(
            f"state inputs {_names([i for i, _ in pairs])} and outputs "
            f"{_names([o for _, o in pairs])}"
        )
    return (
        f"a training graph ({'; '.join(found)}): it cannot be served, because its outputs "
        "include the updated running statistics and its batch statistics mix the requests "
        "batched together (a client's result would depend on other clients' requests); "
        "export an eval model with 'python -m export --mode eval', or turn this one into an "
        "eval model with 'python -m runtime recalibrate --train-model <this model.onnx> "
        "--data <batches> --out <eval model.onnx>'"
    )


def check_not_train(model: onnx.ModelProto) -> None:
    """Raise :class:`TrainGraphError` with :func:`train_graph_reason` for a training graph."""
    reason = train_graph_reason(model)
    if reason is not None:
        raise TrainGraphError(reason)
