"""The format of the dim bounds a traced graph keeps in its ONNX metadata, and its reader.

:data:`BOUNDS_KEY` is the ``metadata_props`` key: JSON ``{dim name: {"min": n, "max": n}}``,
each dim and each of its two keys present only when bounded, ``{}`` when nothing is (how the
bounds are found: :mod:`export._bounds`).  Imports onnx only: the repository writer reads them
without torch.
"""

from __future__ import annotations

import json

import onnx

__all__ = ["BOUNDS_KEY", "Bounds", "read_dim_bounds"]

BOUNDS_KEY = "normport.dim_bounds"
Bounds = dict[str, dict[str, int]]


def read_dim_bounds(model: onnx.ModelProto) -> Bounds:
    """``model``'s :data:`BOUNDS_KEY` metadata; ``{}`` when absent (a model not exported here).

    Raises:
        ValueError: the value is not ``{name: {"min"/"max": int >= 0}}`` JSON.
    """
    raw = next((p.value for p in model.metadata_props if p.key == BOUNDS_KEY), None)
    if raw is None:
        return {}
    try:
        bounds = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata_props[{BOUNDS_KEY!r}] is not JSON ({err})") from None
    if not isinstance(bounds, dict) or not all(
        isinstance(entry, dict)
        and entry
        and set(entry) <= {"min", "max"}
        and all(type(v) is int and v >= 0 for v in entry.values())
        for entry in bounds.values()
    ):
        raise ValueError(
            f'metadata_props[{BOUNDS_KEY!r}] must map dim names to {{"min": n, "max": n}} '
            f"(ints >= 0, at least one), got {raw[:80]!r}"
        )
    return bounds
