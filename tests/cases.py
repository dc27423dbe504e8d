"""Test cases as data: every normport layer, its torch.nn twin, configurations and shapes.

Each :class:`LayerCase` names one layer in one configuration, the twin built with the same
arguments, and the input shapes of a multi-step training run (batch sizes vary from step to
step, so that running statistics see batches of different ``n``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from normport import models
from normport.models.convert import TorchSequenceBatchNorm

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerCase:
    id: str
    ours: Callable[..., nn.Module]
    twin: Callable[..., nn.Module] | None
    kwargs: dict = field(default_factory=dict)
    shapes: Sequence[Shape] = ()
    stateful: bool = False  # keeps running statistics

    def build(self, device=None, dtype=None) -> tuple[nn.Module, nn.Module | None]:
        ours = self.ours(**self.kwargs, device=device, dtype=dtype)
        return ours, None if self.twin is None else self.twin(
            **self.kwargs, device=device, dtype=dtype
        )


# Configurations of the layers with running statistics, PyTorch-test style ids.
RUNNING_CONFIGS = {
    "affine_momentum": {"affine": True, "track_running_stats": True, "momentum": 0.1},
    "affine_cumulative_average": {"affine": True, "track_running_stats": True, "momentum": None},
    "no_affine_momentum_eps": {
        "affine": False,
        "track_running_stats": True,
        "momentum": 0.3,
        "eps": 1e-3,
    },
    "affine_no_tracking": {"affine": True, "track_running_stats": False},
}

INSTANCE_CONFIGS = {
    "default": {},
    "affine_tracking": {"affine": True, "track_running_stats": True, "momentum": 0.2},
    "affine_tracking_momentum_none": {
        "affine": True,
        "track_running_stats": True,
        "momentum": None,
    },
    "tracking_eps": {"track_running_stats": True, "eps": 1e-3},
}


def _steps(*batch_sizes: int, rest: Shape) -> tuple[Shape, ...]:
    return tuple((b, *rest) for b in batch_sizes)


_BATCHES = (4, 7, 2, 5, 3)  # five training steps with varying batch sizes


def _running_cases() -> list[LayerCase]:
    layers = [
        ("BatchNorm1d_2d", models.BatchNorm1d, nn.BatchNorm1d, (5,)),
        ("BatchNorm1d_3d", models.BatchNorm1d, nn.BatchNorm1d, (5, 6)),
        ("BatchNorm2d", models.BatchNorm2d, nn.BatchNorm2d, (5, 4, 3)),
        ("BatchNorm3d", models.BatchNorm3d, nn.BatchNorm3d, (5, 3, 2, 3)),
        ("SequenceBatchNorm", models.SequenceBatchNorm, TorchSequenceBatchNorm, (6, 5)),
    ]
    cases = []
    for name, ours, twin, rest in layers:
        c = 5
        for cfg_id, cfg in RUNNING_CONFIGS.items():
            cases.append(
                LayerCase(
                    f"{name}-{cfg_id}",
                    ours,
                    twin,
                    {"num_features": c, **cfg},
                    _steps(*_BATCHES, rest=rest),
                    stateful=True,
                )
            )
    for dims, ours, twin in (
        (1, models.InstanceNorm1d, nn.InstanceNorm1d),
        (2, models.InstanceNorm2d, nn.InstanceNorm2d),
        (3, models.InstanceNorm3d, nn.InstanceNorm3d),
    ):
        rest = (4, *(5, 3, 2)[:dims])
        for cfg_id, cfg in INSTANCE_CONFIGS.items():
            cases.append(
                LayerCase(
                    f"InstanceNorm{dims}d-{cfg_id}",
                    ours,
                    twin,
                    {"num_features": 4, **cfg},
                    _steps(*_BATCHES, rest=rest),
                    stateful=True,
                )
            )
    return cases


def _stateless_cases() -> list[LayerCase]:
    cases = [
        LayerCase(
            f"GroupNorm-{cfg_id}",
            models.GroupNorm,
            nn.GroupNorm,
            kw,
            _steps(*_BATCHES, rest=rest),
        )
        for cfg_id, kw, rest in (
            ("affine_3groups_2d", {"num_groups": 3, "num_channels": 6}, (6, 4, 5)),
            (
                "no_affine_eps_1d",
                {"num_groups": 2, "num_channels": 4, "affine": False, "eps": 1e-3},
                (4, 7),
            ),
            ("per_channel_groups_3d", {"num_groups": 4, "num_channels": 4}, (4, 2, 3, 2)),
            ("one_group_flat", {"num_groups": 1, "num_channels": 6}, (6,)),
        )
    ]
    cases += [
        LayerCase(
            f"LayerNorm-{cfg_id}", models.LayerNorm, nn.LayerNorm, kw, _steps(*_BATCHES, rest=rest)
        )
        for cfg_id, kw, rest in (
            ("affine_last_dim", {"normalized_shape": 8}, (3, 8)),
            ("affine_two_dims_eps", {"normalized_shape": (3, 8), "eps": 1e-3}, (3, 8)),
            ("no_bias", {"normalized_shape": [8], "bias": False}, (8,)),
            ("no_affine", {"normalized_shape": 8, "elementwise_affine": False}, (2, 3, 8)),
        )
    ]
    cases += [
        LayerCase(f"RMSNorm-{cfg_id}", models.RMSNorm, nn.RMSNorm, kw, _steps(*_BATCHES, rest=rest))
        for cfg_id, kw, rest in (
            ("affine_eps_none", {"normalized_shape": 8}, (3, 8)),
            ("affine_eps", {"normalized_shape": 8, "eps": 1e-4}, (3, 8)),
            ("two_dims", {"normalized_shape": (3, 8), "eps": 1e-6}, (3, 8)),
            ("no_affine", {"normalized_shape": 8, "elementwise_affine": False}, (8,)),
        )
    ]
    return cases


TWIN_CASES: list[LayerCase] = _running_cases() + _stateless_cases()


def ids(cases: Sequence[LayerCase]) -> list[str]:
    return [c.id for c in cases]


def make_input(shape: Shape, gen: torch.Generator, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Non-standard data: per-position offsets and scales, so statistics are far from 0 / 1."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * (1.0 + 2.0 * torch.rand(shape[-1:], generator=gen, dtype=torch.float64)) + 0.7
    return x.to(device=device, dtype=dtype)
