"""Real architectures (torchvision, timm, transformers) through ``export.to_onnx_opsets``.

Each row: the model (random init, randomized norms) traced once per mode, emitted at several
opsets, and checked for structure (exactly one node per norm layer, of the op the README's
table gives, and no primitive pile left where a norm was) and numbers (onnxruntime against the
original PyTorch model, per output by name; in train mode three fed-back steps with varying
batch sizes, outputs and every running statistic).
"""

from __future__ import annotations

import collections
import copy
import functools

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from normport import export
from tests.onnx_helpers import default_opset, top_level_ops
from tests.thirdparty.harness import (
    TOLERANCES,
    compare,
    norm_nodes,
    reference,
    state_buffers,
)
from tests.thirdparty.models import ARCHS, mixed_train, norm_modules

OPSETS = {"eval": (13, 17, 23), "train": (17, 23)}
EVAL_BATCHES = ((2, 0), (3, 11))  # (batch, seed): the example, then another batch size
TRAIN_BATCHES = ((4, 21), (3, 22), (5, 23))  # three fed-back steps

# Rows (architectures, all their cells) over 10 s on a 2-core machine, from
# `pytest tests/thirdparty --durations=0`; almost all of it is the trace, paid by each mode's
# first opset, so the whole row is marked and `-m "not slow"` never moves a trace elsewhere.
SLOW = {
    "tv_resnet18",  # 9 s eval + 9 s train
    "tv_mobilenet_v3_small",  # 18 s eval + 20 s train
    "tv_convnext_tiny_short",  # 10 s
    "tv_swin_t_short",  # 15 s
    "timm_convnext_atto",  # 11 s
    "timm_efficientnet_b0",  # 18 s eval + 24 s train
}


def _params():
    if SLOW - set(ARCHS):
        raise ValueError(f"SLOW names unknown rows {sorted(SLOW - set(ARCHS))}")
    for arch in ARCHS.values():
        marks = [pytest.mark.slow] if arch.id in SLOW else []
        for mode in ("eval", "train") if arch.train else ("eval",):
            for opset in OPSETS[mode]:
                yield pytest.param(
                    arch.id, mode, opset, id=f"{arch.id}-{mode}-{opset}", marks=marks
                )


# Rows are listed architecture-major, so caching one model / one export at a time keeps memory
# flat while every architecture is still built once and traced once per mode.
@functools.lru_cache(maxsize=1)
def _net(arch_id: str) -> nn.Module:
    return ARCHS[arch_id].build()


@functools.lru_cache(maxsize=1)
def _exported(arch_id: str, mode: str):
    """``(net, {opset: model} or the export's exception, PyTorch's reference run)``: the
    trace and the PyTorch side (which does not depend on the opset) once per mode."""
    arch = ARCHS[arch_id]
    net = copy.deepcopy(_net(arch_id))
    if mode == "train":
        mixed_train(net)
    try:
        models = export.to_onnx_opsets(
            net, arch.inputs(*EVAL_BATCHES[0]), mode=mode, opsets=OPSETS[mode]
        )
    except Exception as e:  # re-raised by every opset's test
        return net, e, None
    batches = EVAL_BATCHES if mode == "eval" else TRAIN_BATCHES
    return net, models, reference(net, [arch.inputs(*b) for b in batches])


def _expected_op(layer: nn.Module, mode: str, opset: int) -> str:
    """The op the README's table gives a norm layer, from its torch.nn class (not the
    exporter's registry); hand-written RMS norms are RMSNorm."""
    if type(layer).__name__ == "StdConv2d":  # F.batch_norm(weight, training=True), no stats
        return "normport.BatchNormBatchStats"
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if mode == "train" and layer.training and layer.track_running_stats:
            return "normport.BatchNormTrain" + ("Cumulative" if layer.momentum is None else "")
        return "BatchNormalization"
    if isinstance(layer, nn.LayerNorm):
        return "LayerNormalization" if opset >= 17 else "normport.LayerNorm"
    if isinstance(layer, nn.GroupNorm):
        # The default target keeps the function at every opset: onnxruntime has no CPU kernel
        # for GroupNormalization-21 (README, "What each layer becomes").
        return "normport.GroupNorm"
    if isinstance(layer, nn.RMSNorm) or "RMSNorm" in type(layer).__name__:
        return "RMSNormalization" if opset >= 23 else "normport.RMSNorm"
    if type(layer).__name__ == "T5LayerNorm":  # RMS: no centring, no bias
        return "RMSNormalization" if opset >= 23 else "normport.RMSNorm"
    raise AssertionError(f"no expected op for {type(layer).__name__}")


def _check_randomized(arch_id: str, net: nn.Module) -> None:
    """The row exports in train mode exactly when it has BatchNorm layers with running
    statistics, and its norms are randomized (never weight=1 / bias=0)."""
    layers = norm_modules(net, ARCHS[arch_id].handwritten)
    assert layers, f"{arch_id} has no norm layer"
    batchnorm = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in layers.values()
    )
    assert ARCHS[arch_id].train == batchnorm
    for path, m in layers.items():
        for name, trivial in (("weight", 1.0), ("bias", 0.0), ("running_var", 1.0)):
            value = getattr(m, name, None)
            if value is not None:
                assert not torch.allclose(value, torch.full_like(value, trivial)), f"{path}.{name}"
        if getattr(m, "running_var", None) is not None:
            assert (m.running_var > 0).all(), path


def _check_structure(arch_id: str, mode: str, opset: int, net: nn.Module, model: onnx.ModelProto):
    arch = ARCHS[arch_id]
    layers = norm_modules(net, arch.handwritten, arch.functional)
    nodes = norm_nodes(model)
    classes = collections.Counter(type(m).__name__ for m in layers.values())
    assert len(nodes) == len(layers), (
        f"{len(nodes)} norm nodes {dict(collections.Counter(nodes))} for {len(layers)} norm "
        f"layers {dict(classes)}"
    )
    expected = collections.Counter(_expected_op(m, mode, opset) for m in layers.values())
    assert collections.Counter(nodes) == expected
    ops = collections.Counter(top_level_ops(model))
    over = {op: ops[op] for op, limit in arch.op_limits.items() if ops[op] > limit}
    assert not over, f"primitive ops beyond the non-norm layers' own {dict(arch.op_limits)}: {over}"


@pytest.mark.parametrize(("arch_id", "mode", "opset"), list(_params()))
def test_architecture(arch_id: str, mode: str, opset: int):
    arch = ARCHS[arch_id]
    _check_randomized(arch_id, _net(arch_id))
    net, models, ref = _exported(arch_id, mode)
    if isinstance(models, Exception):
        raise models
    model = models[opset]
    assert default_opset(model) == opset
    _check_structure(arch_id, mode, opset, net, model)

    state = set(state_buffers(net)) if mode == "train" else set()
    assert len(model.graph.input) == len(arch.inputs(*EVAL_BATCHES[0])) + len(state)
    steps = compare(model, ref)
    outputs = set(steps[0].outputs) | {f"{s}.next" for s in state}
    assert {o.name for o in model.graph.output} == outputs
    for i, step in enumerate(steps):
        label = f"{arch_id} {mode} opset {opset} step {i} (batch {step.batch})"
        for name, (ours, theirs) in step.outputs.items():
            atol, rtol = TOLERANCES["output"]
            np.testing.assert_allclose(
                ours, theirs, atol=atol, rtol=rtol, err_msg=f"{label}: {name}"
            )
        for name, (ours, theirs) in step.state.items():
            if name.endswith("num_batches_tracked.next"):
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{label}: {name}")
                continue
            atol, rtol = TOLERANCES["state"]
            np.testing.assert_allclose(
                ours, theirs, atol=atol, rtol=rtol, err_msg=f"{label}: {name}"
            )
