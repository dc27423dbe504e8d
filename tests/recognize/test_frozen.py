"""torchvision's FrozenBatchNorm2d (an eval BatchNorm folded by hand) -> one
BatchNormalization with its four buffers, in eval and train exports alike."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.onnx_helpers import top_level_ops
from tests.recognize.harness import (
    check_matched,
    check_not_matched,
    check_numbers,
    export_opsets,
    layers,
    randomize,
)


class FrozenBN(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's buffers and forward, verbatim."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class Reordered(FrozenBN):
    """The same fold with every commutative operand swapped and the views at the end."""

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.running_var + self.eps) * self.weight
        bias = self.bias - scale * self.running_mean
        return bias.view(1, -1, 1, 1) + scale.view(1, -1, 1, 1) * x


class NoWeight(FrozenBN):
    def forward(self, x: Tensor) -> Tensor:
        scale = (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        return x * scale + (
            self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        )


class ChannelLast(FrozenBN):
    def forward(self, x: Tensor) -> Tensor:  # (N, L, C)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale + (self.bias - self.running_mean * scale)


SHAPE = (2, 6, 5, 4)


@pytest.mark.parametrize("cls", [FrozenBN, Reordered, NoWeight], ids=lambda c: c.__name__)
def test_folded_forms(cls):
    models = check_matched(randomize(cls(6, eps=1e-3)), SHAPE, "batchnorm", "BatchNormalization")
    for model in models.values():
        (node,) = model.graph.node
        assert {a.name: a.f for a in node.attribute}["epsilon"] == pytest.approx(1e-3)
        inputs = {i.name for i in model.graph.initializer}
        assert set(node.input[1:]) <= inputs  # the buffers themselves, not folded constants


def test_channel_last_is_sequence_batchnorm():
    check_matched(randomize(ChannelLast(6)), (2, 7, 6), "sequence_batchnorm", ["Mul", "Add"])


def test_torchvision_class():
    from tests.thirdparty._torchvision import torchvision

    module = randomize(torchvision.ops.misc.FrozenBatchNorm2d(6))
    models = check_matched(module, SHAPE, "batchnorm", "BatchNormalization")
    assert [e["cls"] for e in layers(models[13])] == ["FrozenBatchNorm2d"]


def test_train_export_keeps_running_statistics():
    """Frozen whatever the flag: beside a training BatchNorm2d it is still BatchNormalization."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), randomize(FrozenBN(6)), randomize(nn.BatchNorm2d(6))
    ).train()
    models = export_opsets(net, (3, 3, 5, 4), mode="train")
    for model in models.values():
        assert [(e["kind"], e["source"], e["node"]) for e in layers(model)] == [
            ("batchnorm", "handwritten", "BatchNormalization"),
            ("batchnorm", "module", "normport.BatchNormTrain"),
        ]
        assert top_level_ops(model) == ["Conv", "BatchNormalization", "normport.BatchNormTrain"]
    check_numbers(net, models, (3, 3, 5, 4))


class NearMiss(FrozenBN):
    def __init__(self, form: str):
        super().__init__(6)
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rm, rv = self.running_mean.reshape(1, -1, 1, 1), self.running_var.reshape(1, -1, 1, 1)
        if self.form == "plain_affine":  # x * s + t: no statistics, no norm
            return x * w + b
        scale = w * (rv + self.eps).rsqrt()
        if self.form == "shift_without_scale":
            return x * scale + (b - rm * w)
        if self.form == "eps_outside_root":
            scale = w / (rv.sqrt() + self.eps)
            return x * scale + (b - rm * scale)
        if self.form == "other_axis":  # buffers broadcast along H (6 entries too)
            scale = scale.reshape(1, 1, -1, 1)
            return x * scale + (b - rm * scale.reshape(1, -1, 1, 1)).reshape(1, 1, -1, 1)
        raise AssertionError(self.form)


@pytest.mark.parametrize(
    "form", ["plain_affine", "shift_without_scale", "eps_outside_root", "other_axis"]
)
def test_near_misses_are_left_alone(form):
    check_not_matched(randomize(NearMiss(form)), (2, 6, 6, 5), label=form)
