"""Find every normalization in a traced model and make each one placeholder node.

Layers with a known ``forward`` (normport's, and torch.nn's own classes: :mod:`models.table`)
already arrive as placeholder calls.  Everything else is found on the ATen graph of the
``torch.export`` program, so recognition depends on what the code computes, never on class
names.  The rules run in :data:`RULES` order; each is a function ``rule(graph)`` that calls
:meth:`export.recognize._graph.Graph.replace` for every match.

Adding a rule: a module here (or under ``handwritten/``) with one function taking a
:class:`Graph`, listed in :data:`RULES`, with a test holding a positive case, near-misses that
must not match and a numeric parity check.
"""

from __future__ import annotations

import torch

from normport.export._placeholder import LayerSpec, norm_op
from normport.export.recognize._graph import Graph
from normport.export.recognize.functional import recognize_functional
from normport.export.recognize.handwritten import (
    recognize_frozen,
    recognize_rmsnorm,
    recognize_running,
    recognize_standardize,
)

__all__ = ["RULES", "recognize"]

RULES = (
    recognize_functional,
    recognize_frozen,
    recognize_running,
    recognize_standardize,  # before rmsnorm: a LayerNorm's centred part is an RMSNorm pattern
    recognize_rmsnorm,
)


def _placeholder_specs(g: Graph) -> list[LayerSpec]:
    ops = (norm_op(False), norm_op(True))
    return [
        LayerSpec.from_json(node.args[-1])
        for node in g.fx.nodes
        if node.op == "call_function" and node.target in ops
    ]


def _check_state_writes(g: Graph) -> None:
    """Running statistics updated by code normport did not recognise would be lost silently
    (torch.onnx drops buffer mutations), so they are an error."""
    for node in g.fx.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for arg, formal in zip(node.args, schema.arguments, strict=False):
            name = g.buffer_name(arg) if isinstance(arg, torch.fx.Node) else None
            if name is not None and formal.alias_info is not None and formal.alias_info.is_write:
                path, cls = g.owner(node)
                raise ValueError(
                    f"buffer {name!r} is updated in place by {node.target} in "
                    f"{path or '<root>'!r} ({cls}), which normport did not recognise as a "
                    "normalization: the update would be lost in ONNX. Use a torch.nn or "
                    "normport layer (or F.batch_norm) for running statistics, or export in eval"
                )


def recognize(program: torch.export.ExportedProgram) -> list[LayerSpec]:
    """Rewrite ``program`` in place; returns the spec of every placeholder, in graph order."""
    g = Graph(program)
    for rule in RULES:
        rule(g)
    _check_state_writes(g)
    g.recompile()
    specs = _placeholder_specs(g)
    _check_one_update_per_layer(specs)
    return specs


def _check_one_update_per_layer(specs: list[LayerSpec]) -> None:
    """A train graph gives each stateful layer one update per step.  Checked here, before
    torch.onnx's common-subexpression elimination could merge two identical calls."""
    seen: set[str] = set()
    for spec in specs:
        if not spec.update_stats:
            continue
        if spec.path in seen:
            raise ValueError(
                f"layer {spec.path or '<root>'!r} ({spec.cls}) is called more than once in "
                "one forward: a train-mode export gives each stateful layer one update per "
                "step; use a separate module per call"
            )
        seen.add(spec.path)
