"""Bad input raises a precise, PyTorch-style error, and leaves the layer's state untouched."""

from __future__ import annotations

import re

import pytest
import torch

from normport import models

ALL_CLASSES = {
    "BatchNorm1d": lambda **kw: models.BatchNorm1d(3, **kw),
    "BatchNorm2d": lambda **kw: models.BatchNorm2d(3, **kw),
    "BatchNorm3d": lambda **kw: models.BatchNorm3d(3, **kw),
    "SequenceBatchNorm": lambda **kw: models.SequenceBatchNorm(3, **kw),
    "InstanceNorm1d": lambda **kw: models.InstanceNorm1d(3, **kw),
    "InstanceNorm2d": lambda **kw: models.InstanceNorm2d(3, **kw),
    "InstanceNorm3d": lambda **kw: models.InstanceNorm3d(3, **kw),
    "SwitchableNorm1d": lambda **kw: models.SwitchableNorm1d(3, **kw),
    "SwitchableNorm2d": lambda **kw: models.SwitchableNorm2d(3, **kw),
    "GroupNorm": lambda **kw: models.GroupNorm(1, 3, **kw),
    "LayerNorm": lambda **kw: models.LayerNorm(3, **kw),
    "RMSNorm": lambda **kw: models.RMSNorm(3, **kw),
}
WITH_MOMENTUM = [
    n for n in ALL_CLASSES if "Norm" in n and ("Batch" in n or "Instance" in n or "Switch" in n)
]


@pytest.mark.parametrize("eps", [0, 0.0, -1e-5, float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(ALL_CLASSES))
def test_eps_must_be_positive(name, eps):
    with pytest.raises(
        ValueError, match=rf"eps must be a finite number > 0, got {re.escape(repr(eps))}"
    ):
        ALL_CLASSES[name](eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("name", WITH_MOMENTUM)
def test_momentum_must_be_in_unit_interval(name, momentum):
    with pytest.raises(
        ValueError, match=rf"momentum must be in \[0, 1\] or None, got {momentum!r}"
    ):
        ALL_CLASSES[name](momentum=momentum)


@pytest.mark.parametrize("name", WITH_MOMENTUM)
def test_momentum_must_be_a_number(name):
    with pytest.raises(TypeError, match=r"momentum must be a float in \[0, 1\] or None, got '0.1'"):
        ALL_CLASSES[name](momentum="0.1")


# (layer factory, input shape, mode, exception, message regex)
INPUT_ERRORS = [
    (
        "bn1d_rank",
        lambda: models.BatchNorm1d(3),
        (2, 3, 4, 5),
        "train",
        r"expected 2D or 3D input \(got 4D input\)",
    ),
    (
        "bn2d_rank",
        lambda: models.BatchNorm2d(3),
        (2, 3, 4),
        "eval",
        r"expected 4D input \(got 3D input\)",
    ),
    (
        "bn3d_rank",
        lambda: models.BatchNorm3d(3),
        (2, 3, 4, 4),
        "train",
        r"expected 5D input \(got 4D input\)",
    ),
    (
        "seqbn_rank",
        lambda: models.SequenceBatchNorm(3),
        (2, 3),
        "train",
        r"expected 3D input \(got 2D input\)",
    ),
    (
        "in2d_rank",
        lambda: models.InstanceNorm2d(3),
        (3, 4),
        "train",
        r"expected 3D or 4D input \(got 2D input\)",
    ),
    (
        "sn2d_rank",
        lambda: models.SwitchableNorm2d(3),
        (2, 3, 4),
        "train",
        r"expected 4D input \(got 3D input\)",
    ),
    (
        "gn_rank",
        lambda: models.GroupNorm(1, 3),
        (3,),
        "train",
        r"expected at least 2D input \(got 1D input\)",
    ),
    (
        "bn_channels",
        lambda: models.BatchNorm1d(3),
        (2, 4),
        "train",
        r"expected input's size at dim=1 to match num_features \(3\), but got: 4\.",
    ),
    (
        "bn2d_channels_eval",
        lambda: models.BatchNorm2d(3),
        (2, 5, 2, 2),
        "eval",
        r"expected input's size at dim=1 to match num_features \(3\), but got: 5\.",
    ),
    (
        "seqbn_channels",
        lambda: models.SequenceBatchNorm(3),
        (2, 3, 4),
        "train",
        r"expected input's size at dim=2 to match num_features \(3\), but got: 4\.",
    ),
    (
        "in_channels_no_affine",
        lambda: models.InstanceNorm1d(3),
        (2, 4, 5),
        "train",
        r"expected input's size at dim=1 to match num_features \(3\), but got: 4\.",
    ),
    (
        "sn_channels",
        lambda: models.SwitchableNorm2d(3),
        (2, 4, 2, 2),
        "train",
        r"expected input's size at dim=1 to match num_features \(3\), but got: 4\.",
    ),
    (
        "gn_channels",
        lambda: models.GroupNorm(2, 4),
        (2, 6, 3),
        "train",
        r"expected input's size at dim=1 to match num_channels \(4\), but got: 6\.",
    ),
    (
        "ln_shape",
        lambda: models.LayerNorm((4, 5)),
        (2, 5, 4),
        "train",
        r"Given normalized_shape=\[4, 5\], expected input with shape \[\*, 4, 5\], but got input of size \[2, 5, 4\]",
    ),
    (
        "rms_shape",
        lambda: models.RMSNorm(4),
        (2, 3),
        "eval",
        r"Given normalized_shape=\[4\], expected input with shape \[\*, 4\], but got input of size \[2, 3\]",
    ),
    (
        "bn_one_value",
        lambda: models.BatchNorm1d(3),
        (1, 3),
        "train",
        r"Expected more than 1 value per channel when training, got input size torch\.Size\(\[1, 3\]\)",
    ),
    (
        "bn2d_one_value",
        lambda: models.BatchNorm2d(3),
        (1, 3, 1, 1),
        "train",
        r"Expected more than 1 value per channel when training, got input size torch\.Size\(\[1, 3, 1, 1\]\)",
    ),
    (
        "bn_one_value_untracked_eval",
        lambda: models.BatchNorm1d(3, track_running_stats=False),
        (1, 3),
        "eval",
        r"Expected more than 1 value per channel when training",
    ),
    (
        "seqbn_one_value",
        lambda: models.SequenceBatchNorm(3),
        (1, 1, 3),
        "train",
        r"Expected more than 1 value per channel when training, got input size torch\.Size\(\[1, 1, 3\]\)",
    ),
    (
        "sn_one_value",
        lambda: models.SwitchableNorm2d(3),
        (1, 3, 1, 1),
        "train",
        r"Expected more than 1 value per channel when training",
    ),
    (
        "in_one_spatial",
        lambda: models.InstanceNorm2d(3),
        (2, 3, 1, 1),
        "train",
        r"Expected more than 1 spatial element when training, got input size torch\.Size\(\[2, 3, 1, 1\]\)",
    ),
]


@pytest.mark.parametrize(
    ("factory", "shape", "mode", "message"),
    [case[1:] for case in INPUT_ERRORS],
    ids=[case[0] for case in INPUT_ERRORS],
)
def test_bad_input(factory, shape, mode, message):
    layer = factory().train(mode == "train")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))
    # Nothing is lost: a rejected batch leaves the statistics (and the batch count) alone.
    # (torch.nn advances num_batches_tracked before it rejects a one-value batch.)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            lambda: models.GroupNorm(4, 6),
            r"num_channels must be divisible by num_groups, got num_channels=6 and num_groups=4",
        ),
        (lambda: models.GroupNorm(0, 6), r"num_groups must be a positive int, got 0"),
        (lambda: models.BatchNorm2d(0), r"num_features must be a positive int, got 0"),
        (lambda: models.BatchNorm2d(2.5), r"num_features must be a positive int, got 2\.5"),
        (lambda: models.LayerNorm([]), r"normalized_shape must be positive ints, got \[\]"),
        (lambda: models.RMSNorm((4, -1)), r"normalized_shape must be positive ints, got \(4, -1\)"),
    ],
)
def test_bad_constructor_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_eps_type_is_checked():
    with pytest.raises(TypeError, match=r"eps must be a float, got str: '1e-5'"):
        models.LayerNorm(4, eps="1e-5")


@pytest.mark.parametrize("to", ["onnx", "TORCH", None])
def test_convert_rejects_unknown_target(to):
    with pytest.raises(ValueError, match=rf"to must be 'normport' or 'torch', got {to!r}"):
        models.convert(models.LayerNorm(3), to=to)
