"""Run an exported architecture in onnxruntime beside PyTorch: outputs by name, fed-back steps.

Shared by ``test_architectures.py`` (asserts) and ``corpus.py`` (reports).  Everything here
reads the ONNX file and the PyTorch model from the outside: the norm count comes from
:func:`tests.thirdparty.models.norm_modules`, the state names from ``model.named_buffers()``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from tests.onnx_helpers import session, top_level_ops

__all__ = [
    "NORM_OPS",
    "STATE_SUFFIXES",
    "TOLERANCES",
    "Step",
    "Reference",
    "compare",
    "leaves",
    "norm_nodes",
    "reference",
    "state_buffers",
]

NORM_OPS = frozenset(
    {
        "BatchNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "RMSNormalization",
    }
)
FUNCTION_DOMAIN = "normport"
STATE_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

# (atol, rtol), float32, onnxruntime vs PyTorch; num_batches_tracked must be equal.
TOLERANCES = {
    # Up to ~50 layers of convolutions / matmuls: MLAS and PyTorch's CPU kernels sum in
    # different orders (~1e-7 relative per layer), and randomized running statistics let
    # activations grow to O(10-100) in BatchNorm nets.
    "output": (1e-4, 1e-4),
    # Running statistics are one reduction over the batch of an activation that already carries
    # the error above, times momentum 0.1.
    "state": (1e-5, 1e-4),
}


def norm_nodes(model: onnx.ModelProto) -> list[str]:
    """Top-level nodes that are a standard norm op or a call into the ``normport`` domain."""
    return [
        op
        for node, op in zip(model.graph.node, top_level_ops(model), strict=True)
        if (node.domain in ("", "ai.onnx") and node.op_type in NORM_OPS)
        or node.domain == FUNCTION_DOMAIN
    ]


def leaves(output) -> dict[str, Tensor]:
    """A forward's result as ``{name: tensor}``: a ModelOutput / dict by field name, a tensor
    as ``output``, a tuple as ``output_<i>`` (the exporter's naming contract)."""
    if isinstance(output, Tensor):
        return {"output": output}
    if isinstance(output, Mapping):
        return {k: v for k, v in output.items() if v is not None}
    if isinstance(output, Sequence):
        return {f"output_{i}": v for i, v in enumerate(output)}
    raise TypeError(f"unexpected forward result {type(output).__name__}")


def state_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Running statistics of the norm layers in training mode, by ``named_buffers()`` name."""
    training = {path for path, m in model.named_modules() if m.training}
    return {
        name: b
        for name, b in model.named_buffers()
        if name.rpartition(".")[2] in STATE_SUFFIXES and name.rpartition(".")[0] in training
    }


def _data_feeds(sess: ort.InferenceSession, inputs: Sequence[Tensor], state: set[str]):
    names = [i.name for i in sess.get_inputs() if i.name not in state]
    if len(names) != len(inputs):
        raise AssertionError(f"graph data inputs {names}, but {len(inputs)} example input(s)")
    return {n: t.numpy() for n, t in zip(names, inputs, strict=True)}


def _max_abs(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != PyTorch's {expected.shape}")
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    return float(diff.max()) if diff.size else 0.0


@dataclass
class Step:
    """One batch through both runtimes: ``{name: (onnxruntime, pytorch)}``."""

    batch: int
    outputs: dict[str, tuple[np.ndarray, np.ndarray]]
    state: dict[str, tuple[np.ndarray, np.ndarray]]

    def mismatches(self) -> list[str]:
        """``name: max abs error`` for every pair beyond :data:`TOLERANCES`."""
        bad = []
        for kind, pairs in (("output", self.outputs), ("state", self.state)):
            atol, rtol = TOLERANCES[kind]
            for name, (actual, expected) in pairs.items():
                exact = name.endswith("num_batches_tracked.next")
                if _max_abs(actual, expected) and (
                    exact or not np.allclose(actual, expected, atol=atol, rtol=rtol)
                ):
                    bad.append(f"{name}: max abs error {_max_abs(actual, expected):.3g}")
        return bad

    def max_abs(self) -> float:
        pairs = [*self.outputs.values(), *self.state.values()]
        return max((_max_abs(a, e) for a, e in pairs), default=0.0)


def _outputs(sess: ort.InferenceSession, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def _pair(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]):
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise AssertionError(f"PyTorch outputs {missing} missing from the graph's {sorted(ours)}")
    return {k: (ours[k], theirs[k]) for k in theirs}


@dataclass
class Reference:
    """PyTorch's results for a list of batches: outputs by name and, for a training model, the
    running statistics after each step (by ``named_buffers()`` name)."""

    batches: list[tuple[Tensor, ...]]
    outputs: list[dict[str, np.ndarray]]
    state: list[dict[str, np.ndarray]]


def reference(net: nn.Module, batches: Sequence[tuple[Tensor, ...]]) -> Reference:
    """Run a copy of ``net`` (training flags as they are) over ``batches``, in order: a
    training model steps its running statistics from one batch to the next."""
    net = copy.deepcopy(net)
    outputs, state = [], []
    for inputs in batches:
        with torch.no_grad():
            outputs.append({k: v.numpy().copy() for k, v in leaves(net(*inputs)).items()})
        # Copies: the buffers change in place on the next step.
        state.append({k: v.numpy().copy() for k, v in state_buffers(net).items()})
    return Reference(list(batches), outputs, state)


def compare(model: onnx.ModelProto, ref: Reference) -> list[Step]:
    """Run ``model`` over the reference's batches in onnxruntime and pair every PyTorch output
    and running statistic with the graph's output of that name.  State is fed back: the
    ``<buffer>.next`` outputs of one step are the ``<buffer>`` inputs of the next; the first
    step feeds none, so the graph's defaults must be the exported statistics."""
    names = set(ref.state[0]) if ref.state else set()
    # Not sess.get_inputs(): onnxruntime lists initializer-backed inputs apart, as overridable
    # initializers.
    graph_inputs = {i.name for i in model.graph.input}
    if not names <= graph_inputs:
        raise AssertionError(f"state inputs missing from the graph: {sorted(names - graph_inputs)}")
    sess = session(model)
    feeds_state: dict[str, np.ndarray] = {}
    steps = []
    for inputs, expected, state in zip(ref.batches, ref.outputs, ref.state, strict=True):
        got = _outputs(sess, {**_data_feeds(sess, inputs, names), **feeds_state})
        paired_state = _pair(got, {f"{k}.next": v for k, v in state.items()})
        feeds_state = {k: got[f"{k}.next"] for k in state}
        steps.append(Step(len(inputs[0]), _pair(got, expected), paired_state))
    return steps
