"""What became of a model's normalization layers, as aligned text tables.

Read from the ``metadata_props`` that :func:`export.to_onnx` writes: :data:`LAYERS_KEY` (one
JSON object per layer) and :data:`UNRECOGNIZED_KEY` (one per normalization-like module that did
not become one node).  ``python -m export`` prints them after each ``--module`` export.
"""

from __future__ import annotations

import json

import onnx

__all__ = ["LAYERS_KEY", "NORM_OPS", "UNRECOGNIZED_KEY", "align", "layer_table", "norm_ops"]

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


def norm_ops(model: onnx.ModelProto) -> list[str]:
    """The normalization op types of ``model``'s graph: standard ops and normport functions."""
    found = {
        node.op_type
        for node in model.graph.node
        if (node.domain in _STANDARD_DOMAINS and node.op_type in NORM_OPS)
        or node.domain == _FUNCTION_DOMAIN
    }
    return sorted(found)


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


def align(rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> list[str]:
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
        lines += align([["path", "class", "kind", "source", "node"], *rows])
    if partly:
        lines.append(f"normalization-like, not one node: {len(partly)}")
        rows = [[e["path"] or "<root>", e["cls"], e["why"]] for e in partly]
        lines += align([["path", "class", "why"], *rows])
    return "\n".join(lines)
