"""The traced graph as recognition rules see it, and the one way a rule rewrites it.

A rule finds a normalization in the ATen graph of a ``torch.export`` program (the training IR,
where ``aten.batch_norm`` / ``aten.layer_norm`` / ... are still single nodes and hand-written
code is a chain of ``mean`` / ``sub`` / ``rsqrt`` ...), builds its :class:`LayerSpec`, and
calls :meth:`Graph.replace`: the matched output is rerouted to one placeholder call
(``normport::norm_eval`` / ``norm_train``) and the nodes nothing uses any more are erased.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from normport.export._placeholder import TENSOR_NAMES, LayerSpec, norm_op

__all__ = ["Graph", "Slots", "is_op", "only_users"]

_INDEX = re.compile(r"\[(\d+)\]")


def is_op(node: fx.Node, *targets) -> bool:
    """Whether ``node`` calls one of ``targets`` (OpOverloads or OpOverloadPackets)."""
    if node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return node.target in targets or (packet is not None and packet in targets)


@dataclass
class Slots:
    """The placeholder's tensor inputs (``export._placeholder.TENSOR_NAMES``), by name."""

    x: fx.Node
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    running_mean: fx.Node | None = None
    running_var: fx.Node | None = None
    num_batches_tracked: fx.Node | None = None
    mean_weight: fx.Node | None = None
    var_weight: fx.Node | None = None

    def ordered(self) -> list[fx.Node | None]:
        return [getattr(self, name) for name in TENSOR_NAMES]


@dataclass
class Graph:
    """A ``torch.export.ExportedProgram``'s graph with the names of its lifted state."""

    program: torch.export.ExportedProgram
    specs: list[LayerSpec] = field(default_factory=list)

    @property
    def fx(self) -> fx.Graph:
        return self.program.graph_module.graph

    def nodes(self) -> list[fx.Node]:
        return list(self.fx.nodes)

    # -- state -------------------------------------------------------------------------------

    def buffer_name(self, node: fx.Node | None) -> str | None:
        """The module buffer (``layer1.0.bn1.running_mean``) a placeholder node stands for."""
        if node is None or node.op != "placeholder":
            return None
        return self.program.graph_signature.inputs_to_buffers.get(node.name)

    def parameter_name(self, node: fx.Node | None) -> str | None:
        if node is None or node.op != "placeholder":
            return None
        return self.program.graph_signature.inputs_to_parameters.get(node.name)

    def constant(self, node: fx.Node | None) -> bool:
        """A lifted parameter, buffer or constant tensor (not computed from the inputs)."""
        if node is None or node.op != "placeholder":
            return False
        sig = self.program.graph_signature
        return (
            node.name in sig.inputs_to_parameters
            or node.name in sig.inputs_to_buffers
            or node.name in sig.inputs_to_lifted_tensor_constants
        )

    def buffer_node(self, name: str) -> fx.Node | None:
        for node in self.fx.nodes:
            if self.buffer_name(node) == name:
                return node
        return None

    # -- where a node comes from -------------------------------------------------------------

    @staticmethod
    def owner(node: fx.Node) -> tuple[str, str]:
        """``(module path, class name)`` of the innermost module whose forward made ``node``."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", "<root>"
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        return _INDEX.sub(r".\1", path).lstrip("."), cls_name.rsplit(".", 1)[-1]

    @staticmethod
    def val(node: fx.Node):
        """The fake tensor (or value) ``node`` produced while tracing."""
        return node.meta.get("val")

    # -- rewriting ---------------------------------------------------------------------------

    def replace(self, output: fx.Node, spec: LayerSpec, slots: Slots) -> fx.Node:
        """Route ``output``'s users to one placeholder call computing ``spec`` on ``slots``.

        The call is inserted just before ``output`` (every slot is computed before it), the
        nodes of the matched subgraph that nothing else reads are erased, and ``spec`` is
        recorded.  Returns the node holding the normalized tensor.
        """
        graph = self.fx
        op = norm_op(spec.update_stats)
        with graph.inserting_before(output):
            call = graph.call_function(op, (*slots.ordered(), spec.to_json()))
            call.meta.update({k: v for k, v in output.meta.items() if k != "val"})
            result = call
            if spec.update_stats:
                result = graph.call_function(operator.getitem, (call, 0))
                result.meta.update(call.meta)
        if "val" in output.meta:
            result.meta["val"] = output.meta["val"]
        output.replace_all_uses_with(result)
        self.erase_dead([output])
        self.specs.append(spec)
        return result

    def erase_dead(self, roots: Iterable[fx.Node]) -> None:
        """Erase ``roots`` and, transitively, their inputs once nothing reads them."""
        pending = list(roots)
        while pending:
            node = pending.pop()
            # a node read by two erased nodes is reached twice (x.to(float32) feeding both
            # pow and mul): the second visit finds it erased already
            erased = getattr(node, "_erased", False)
            if erased or node.users or node.op in ("placeholder", "output"):
                continue
            inputs = list(node.all_input_nodes)
            self.fx.erase_node(node)
            pending.extend(inputs)

    def recompile(self) -> None:
        self.fx.lint()
        self.program.graph_module.recompile()


def only_users(nodes: Sequence[fx.Node], inside: set[fx.Node]) -> bool:
    """Whether every node of a matched chain but the last is read only inside the match.

    A rule must not swallow an intermediate (``mean``, ``var``) that other code also reads:
    then the match is left alone.
    """
    return all(set(n.users) <= inside for n in nodes)
