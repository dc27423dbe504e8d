"""Export test cases as data: layer x configuration, with the ONNX structure each must give.

The expected structure is written here from the issue's contract (which standard op at which
opset, which function otherwise), independently of :mod:`export.lowerings`, per target:
``"standard"`` gets the standard op wherever the opset has one; ``"onnxruntime"`` (the default)
gets the same except where the measured form table (issue 12) decided otherwise, stated below
at the layer it concerns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from normport import models
from normport.models.randomize import randomize

OPSETS = (13, 15, 17, 18, 21, 23, 28)
TARGETS = ("onnxruntime", "standard")  # the default first


@dataclass(frozen=True)
class ExportCase:
    id: str
    factory: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]  # first: the example; others: other batch / sizes
    dynamic_axes: tuple[int, ...]  # axes of the input left symbolic
    # (mode, opset, layer, target) -> op types
    structure: Callable[[str, int, nn.Module, str], list[str]]

    def build(self, mode: str, seed: int = 0) -> nn.Module:
        layer = self.factory()
        randomize(layer, torch.Generator().manual_seed(seed))
        return layer.train(mode == "train")


def _tracked(layer: nn.Module) -> bool:
    return getattr(layer, "track_running_stats", False)


def _batch_family(eval_op: list[str], base: str, instance: bool = False):
    def structure(mode: str, opset: int, layer: nn.Module, target: str) -> list[str]:
        if not _tracked(layer):
            return ["InstanceNormalization"] if instance else [f"normport.{base}BatchStats"]
        if mode == "eval":
            return eval_op
        suffix = ""
        if layer.momentum is None:
            suffix = "Frozen" if instance else "Cumulative"
        return [f"normport.{base}Train{suffix}"]

    return structure


def _by_opset(standard: str, since: int, function: str, *, onnxruntime_function: bool = False):
    """The standard op from opset ``since``, the function below; ``onnxruntime_function``: the
    onnxruntime target takes the function at every opset."""

    def structure(mode: str, opset: int, layer: nn.Module, target: str) -> list[str]:
        if opset >= since and not (target == "onnxruntime" and onnxruntime_function):
            return [standard]
        return [f"normport.{function}"]

    return structure


def _switchable(mode: str, opset: int, layer: nn.Module, target: str) -> list[str]:
    if not layer.track_running_stats:
        return ["normport.SwitchableNormBatchStats"]
    if mode == "eval":
        return ["normport.SwitchableNorm"]
    return ["normport.SwitchableNormTrain" + ("Cumulative" if layer.momentum is None else "")]


_BN = _batch_family(["BatchNormalization"], "BatchNorm")
_SEQ = _batch_family(["Mul", "Add"], "BatchNorm")
_IN = _batch_family(["BatchNormalization"], "InstanceNorm", instance=True)
# onnxruntime 1.32 has no CPU kernel for GroupNormalization-21 (it expands the op's function
# body, 29 ops): normport.GroupNorm runs in a third of the time there, so the default target
# takes the function at every opset.  LayerNorm and RMSNorm measured a tie: the standard op.
_GN = _by_opset("GroupNormalization", 21, "GroupNorm", onnxruntime_function=True)
_LN = _by_opset("LayerNormalization", 17, "LayerNorm")
_RMS = _by_opset("RMSNormalization", 23, "RMSNorm")

IMAGE = ((4, 6, 5, 5), (1, 6, 5, 5), (3, 6, 7, 4))
CASES = [
    ExportCase("BatchNorm2d-momentum", lambda: models.BatchNorm2d(6), IMAGE, (0, 2, 3), _BN),
    ExportCase(
        "BatchNorm2d-cumulative",
        lambda: models.BatchNorm2d(6, momentum=None, eps=1e-3),
        IMAGE,
        (0, 2, 3),
        _BN,
    ),
    ExportCase(
        "BatchNorm1d_2d-no_affine",
        lambda: models.BatchNorm1d(6, affine=False, momentum=0.3),
        ((5, 6), (2, 6), (9, 6)),
        (0,),
        _BN,
    ),
    ExportCase(
        "BatchNorm3d-no_tracking",
        lambda: models.BatchNorm3d(3, track_running_stats=False),
        ((2, 3, 2, 3, 4), (3, 3, 2, 3, 4), (2, 3, 3, 2, 2)),
        (0, 2, 3, 4),
        _BN,
    ),
    ExportCase(
        "SequenceBatchNorm-momentum",
        lambda: models.SequenceBatchNorm(6),
        ((3, 7, 6), (1, 7, 6), (5, 3, 6)),
        (0, 1),
        _SEQ,
    ),
    ExportCase(
        "SequenceBatchNorm-cumulative",
        lambda: models.SequenceBatchNorm(6, momentum=None),
        ((3, 7, 6), (2, 7, 6), (4, 9, 6)),
        (0, 1),
        _SEQ,
    ),
    ExportCase("InstanceNorm2d-default", lambda: models.InstanceNorm2d(6), IMAGE, (0, 2, 3), _IN),
    ExportCase(
        "InstanceNorm1d-affine_tracking",
        lambda: models.InstanceNorm1d(6, affine=True, track_running_stats=True, momentum=0.2),
        ((4, 6, 9), (1, 6, 9), (2, 6, 5)),
        (0, 2),
        _IN,
    ),
    ExportCase(
        "InstanceNorm3d-tracking_momentum_none",
        lambda: models.InstanceNorm3d(3, track_running_stats=True, momentum=None),
        ((2, 3, 2, 3, 4), (3, 3, 2, 3, 4), (2, 3, 3, 2, 2)),
        (0, 2, 3, 4),
        _IN,
    ),
    ExportCase("GroupNorm-affine", lambda: models.GroupNorm(3, 6), IMAGE, (0, 2, 3), _GN),
    ExportCase(
        "GroupNorm-no_affine_1d",
        lambda: models.GroupNorm(2, 6, affine=False, eps=1e-3),
        ((4, 6, 9), (1, 6, 9), (2, 6, 5)),
        (0, 2),
        _GN,
    ),
    ExportCase(
        "LayerNorm-last_dim",
        lambda: models.LayerNorm(8),
        ((4, 5, 8), (1, 5, 8), (3, 2, 8)),
        (0, 1),
        _LN,
    ),
    ExportCase(
        "LayerNorm-two_dims_no_bias",
        lambda: models.LayerNorm((5, 8), bias=False, eps=1e-3),
        ((4, 5, 8), (1, 5, 8), (2, 5, 8)),
        (0,),
        _LN,
    ),
    ExportCase(
        "LayerNorm-no_affine",
        lambda: models.LayerNorm(8, elementwise_affine=False),
        ((4, 8), (1, 8), (7, 8)),
        (0,),
        _LN,
    ),
    ExportCase(
        "RMSNorm-eps_none",
        lambda: models.RMSNorm(8),
        ((4, 5, 8), (1, 5, 8), (3, 2, 8)),
        (0, 1),
        _RMS,
    ),
    ExportCase(
        "RMSNorm-two_dims",
        lambda: models.RMSNorm((5, 8), eps=1e-4),
        ((4, 5, 8), (1, 5, 8), (2, 5, 8)),
        (0,),
        _RMS,
    ),
    ExportCase(
        "RMSNorm-no_affine",
        lambda: models.RMSNorm(8, elementwise_affine=False, eps=1e-6),
        ((4, 8), (1, 8), (7, 8)),
        (0,),
        _RMS,
    ),
    ExportCase(
        "SwitchableNorm2d-momentum",
        lambda: models.SwitchableNorm2d(6),
        IMAGE,
        (0, 2, 3),
        _switchable,
    ),
    ExportCase(
        "SwitchableNorm1d-cumulative",
        lambda: models.SwitchableNorm1d(6, momentum=None),
        ((4, 6, 9), (2, 6, 9), (3, 6, 5)),
        (0, 2),
        _switchable,
    ),
    ExportCase(
        "SwitchableNorm2d-no_tracking_no_affine",
        lambda: models.SwitchableNorm2d(6, affine=False, track_running_stats=False),
        IMAGE,
        (0, 2, 3),
        _switchable,
    ),
]
