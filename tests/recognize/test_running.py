"""Hand-written eval BatchNorm ``(x - rm) / sqrt(rv + eps) * w + b`` with its running buffers
-> one BatchNormalization (SequenceBatchNorm's folded Mul + Add for channel-last input)."""

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


class RunningNorm(nn.Module):
    """Normalizes with running buffers; ``form`` says how they are broadcast and combined."""

    def __init__(self, c: int, form: str, affine: bool = True):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.ones(c)) if affine else None
        self.bias = nn.Parameter(torch.zeros(c)) if affine else None
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        rm, rv, eps, f = self.running_mean, self.running_var, 1e-5, self.form
        w, b = self.weight, self.bias
        if f == "view_sqrt":
            y = (x - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + eps)
            shape = (1, -1, 1, 1)
        elif f == "index_rsqrt":
            y = (x - rm[None, :, None, None]) * torch.rsqrt(rv[None, :, None, None] + eps)
            shape = (1, -1, 1, 1)
        elif f == "view_after_sqrt":
            y = (x - rm.reshape(1, -1, 1, 1)) / (rv + eps).sqrt().view(1, -1, 1, 1)
            shape = (1, -1, 1, 1)
        elif f == "channel_last":  # (N, L, C): the (C,) buffers broadcast as they are
            y = (x - rm) / torch.sqrt(rv + eps)
            shape = (-1,)
        elif f == "nc":
            y = (x - rm) * (rv + eps) ** -0.5
            shape = (-1,)
        else:
            raise AssertionError(f)
        return y if w is None else y * w.view(shape) + b.view(shape)


@pytest.mark.parametrize("form", ["view_sqrt", "index_rsqrt", "view_after_sqrt"])
def test_batchnorm2d(form):
    check_matched(
        randomize(RunningNorm(6, form)), (2, 6, 4, 5), "batchnorm", "BatchNormalization", label=form
    )


def test_without_affine():
    check_matched(
        randomize(RunningNorm(6, "view_sqrt", affine=False)),
        (2, 6, 4, 5),
        "batchnorm",
        "BatchNormalization",
    )


def test_batchnorm1d_on_n_c():
    check_matched(randomize(RunningNorm(6, "nc")), (4, 6), "batchnorm", "BatchNormalization")


def test_sequence_batchnorm_channel_last():
    check_matched(
        randomize(RunningNorm(6, "channel_last")), (2, 7, 6), "sequence_batchnorm", ["Mul", "Add"]
    )


def test_running_statistics_in_train_mode_too():
    """The forward never reads batch statistics: in a train export it stays running-stats."""
    net = nn.Sequential(randomize(nn.BatchNorm2d(6)), randomize(RunningNorm(6, "view_sqrt")))
    models = export_opsets(net.train(), (3, 6, 4, 5), mode="train")
    for model in models.values():
        assert [(e["kind"], e["source"], e["node"]) for e in layers(model)] == [
            ("batchnorm", "module", "normport.BatchNormTrain"),
            ("batchnorm", "handwritten", "BatchNormalization"),
        ]
        assert top_level_ops(model) == ["normport.BatchNormTrain", "BatchNormalization"]
    check_numbers(net, models, (3, 6, 4, 5))


class NearMiss(RunningNorm):
    def forward(self, x):
        rm, rv, eps, f = self.running_mean, self.running_var, 1e-5, self.form
        w, b = self.weight.view(1, -1, 1, 1), self.bias.view(1, -1, 1, 1)
        if f == "eps_outside_root":
            y = (x - rm.view(1, -1, 1, 1)) / (torch.sqrt(rv.view(1, -1, 1, 1)) + eps)
        elif f == "other_axis":  # broadcast along H, which has C entries too
            y = (x - rm.view(1, 1, -1, 1)) / torch.sqrt(rv.view(1, 1, -1, 1) + eps)
        elif f == "mismatched_axes":
            y = (x - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, 1, -1, 1) + eps)
        elif f == "eps_after_sqrt":
            y = (x - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1)) + eps
        elif f == "shared_centred":
            d = x - rm.view(1, -1, 1, 1)
            return d / torch.sqrt(rv.view(1, -1, 1, 1) + eps) * w + b, d
        else:
            raise AssertionError(f)
        return y * w + b


@pytest.mark.parametrize(
    "form",
    ["eps_outside_root", "other_axis", "mismatched_axes", "eps_after_sqrt", "shared_centred"],
)
def test_near_misses_are_left_alone(form):
    check_not_matched(randomize(NearMiss(6, form)), (2, 6, 6, 5), label=form)
