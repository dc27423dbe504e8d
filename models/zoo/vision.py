"""Image networks: ``cnn_bn``, ``style_in``, ``cnn_gn`` and ``cnn_sn``.

All take ``image`` of shape ``(N, 3, H, W)`` float32 with dynamic batch, height and width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normport import models
from normport.models.zoo._registry import register
from normport.models.zoo._spec import Interface

__all__ = [
    "CLASSIFIER",
    "Classifier",
    "ConvNormAct",
    "IMAGE_TO_IMAGE",
    "ResidualBlock",
    "StyleNet",
    "image_inputs",
]

NormFactory = Callable[[int], nn.Module]

_CLASSES = 10


def image_inputs(
    batch_size: int, generator: torch.Generator, *, height: int, width: int
) -> tuple[Tensor]:
    """One ``(N, 3, H, W)`` standard-normal image batch."""
    return (torch.randn(batch_size, 3, height, width, generator=generator),)


CLASSIFIER = Interface(
    input_fn=image_inputs,
    input_names=("image",),
    output_names=("logits",),
    dynamic_dims={"image": {0: "batch", 2: "height", 3: "width"}},
    dims={"height": 32, "width": 32},
)
IMAGE_TO_IMAGE = dataclasses.replace(CLASSIFIER, output_names=("image_out",))


class ConvNormAct(nn.Sequential):
    """``Conv2d(bias=False) -> norm -> ReLU`` (the ReLU is optional)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: NormFactory,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                bias=False,
            ),
            norm(out_channels),
        ]
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """``relu(conv-norm-relu-conv-norm(x) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 ``conv-norm`` projection when the stride or the
    channel count changes.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormFactory, *, stride: int = 1
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(in_channels, out_channels, norm, stride=stride),
            ConvNormAct(out_channels, out_channels, norm, act=False),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ConvNormAct(
                in_channels, out_channels, norm, kernel_size=1, stride=stride, act=False
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Classifier(nn.Module):
    """``features -> global average pool -> Linear``: image to class logits."""

    def __init__(self, features: nn.Module, channels: int, classes: int = _CLASSES) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(channels, classes)

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.features(image).mean((2, 3)))


def _downsampling_cnn(norm: NormFactory, width: int) -> nn.Module:
    """``conv-norm-relu`` to ``width`` channels, a stride-2 one to ``2 * width``, a residual
    block, pool, linear."""
    features = nn.Sequential(
        ConvNormAct(3, width, norm),
        ConvNormAct(width, 2 * width, norm, stride=2),
        ResidualBlock(2 * width, 2 * width, norm),
    )
    return Classifier(features, 2 * width)


@register(
    "cnn_bn",
    CLASSIFIER,
    description="ResNet-style CNN with BatchNorm2d: stem, two residual blocks, pool, linear.",
)
def cnn_bn() -> nn.Module:
    """Default BatchNorm2d everywhere but the last block (``eps=1e-3``, ``momentum=0.2``)."""
    norm = models.BatchNorm2d
    features = nn.Sequential(
        ConvNormAct(3, 16, norm),
        ResidualBlock(16, 16, norm),
        ResidualBlock(16, 32, functools.partial(norm, eps=1e-3, momentum=0.2), stride=2),
    )
    return Classifier(features, 32)


@register(
    "cnn_gn",
    CLASSIFIER,
    description="Small CNN with GroupNorm (4 groups of 8 and 16 channels) and a residual block.",
)
def cnn_gn() -> nn.Module:
    return _downsampling_cnn(functools.partial(models.GroupNorm, 4), 8)


@register(
    "cnn_sn",
    CLASSIFIER,
    description="CNN with SwitchableNorm2d (instance/layer/batch mixture) and a residual block.",
)
def cnn_sn() -> nn.Module:
    return _downsampling_cnn(models.SwitchableNorm2d, 16)


@register(
    "style_in",
    IMAGE_TO_IMAGE,
    description="Image-to-image style network with InstanceNorm2d, down/residual/up, tanh out.",
)
class StyleNet(nn.Module):
    """Image-to-image style network with InstanceNorm2d (Johnson et al. style, tiny).

    Two stride-2 downsampling convs, two residual blocks, two nearest-upsample + conv stages
    and a ``tanh`` output.  The first instance norm tracks running statistics (eval uses them);
    the residual blocks use affine instance norms without running statistics; the last
    upsampling stage uses a plain (non-affine) one.  ``H`` and ``W`` must be multiples of 4.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        plain = models.InstanceNorm2d
        affine = functools.partial(plain, affine=True)
        tracked = functools.partial(plain, affine=True, track_running_stats=True)
        w = width
        self.down = nn.Sequential(
            ConvNormAct(3, w, tracked),
            ConvNormAct(w, 2 * w, affine, stride=2),
            ConvNormAct(2 * w, 2 * w, affine, stride=2),
        )
        self.blocks = nn.Sequential(
            ResidualBlock(2 * w, 2 * w, affine),
            ResidualBlock(2 * w, 2 * w, affine),
        )
        self.up1 = ConvNormAct(2 * w, w, affine)
        self.up2 = ConvNormAct(w, w, plain)
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        x = self.blocks(self.down(image))
        x = self.up1(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = self.up2(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return torch.tanh(self.out(x))
