"""ONNX output names for whatever a model's ``forward`` returns.

torch.export flattens the output with torch's pytree (dicts in insertion order, tuples and
lists by position, transformers' ``ModelOutput`` by its set fields), and so do these names:

==========================================  ====================================
forward returns                             ONNX outputs
==========================================  ====================================
a tensor                                    ``output``
``(a, b)``                                  ``output_0``, ``output_1``
``{"logits": a, "aux": (b, c)}``            ``logits``, ``aux.0``, ``aux.1``
``BaseModelOutput(last_hidden_state=a)``    ``last_hidden_state``
==========================================  ====================================
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["named_leaves", "output_names"]


def _part(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def output_names(outputs: Any) -> list[str]:
    """One name per tensor leaf of ``outputs``, in torch.export's flattening order.

    Raises:
        TypeError: a leaf is not a tensor (an int, a string, ...): ONNX outputs are tensors.
    """
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    leaves, _spec = pytree.tree_flatten_with_path(outputs)
    names = []
    for path, leaf in leaves:
        where = ".".join(_part(k) for k in path)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"output {where or '<root>'!r} is {type(leaf).__name__} ({leaf!r}): every "
                "output leaf must be a tensor"
            )
        names.append(where)
    if not names:
        raise TypeError(f"forward returned no tensor ({type(outputs).__name__})")
    if isinstance(outputs, tuple | list) and all(n.isdigit() for n in names):
        return [f"output_{n}" for n in names]
    return names


def named_leaves(outputs: Any) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for every tensor leaf of ``outputs``, named as :func:`output_names`.

    Raises:
        TypeError: as :func:`output_names`.
    """
    names = output_names(outputs)
    leaves = [outputs] if isinstance(outputs, torch.Tensor) else pytree.tree_leaves(outputs)
    return dict(zip(names, leaves, strict=True))
