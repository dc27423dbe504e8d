"""Random, non-trivial parameters and running statistics for a module (never gamma=1, beta=0):
what tests, verify and the zoo give a layer so that a wrong term cannot hide."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize"]


@torch.no_grad()
def randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """In place, drawn from ``gen`` in float64, then cast; returns ``module``:

    - ``*weight`` (not SwitchableNorm's ``mean_weight`` / ``var_weight``): ``1 + 0.5 N(0, 1)``;
    - every other parameter: ``N(0, 1)``;
    - ``running_mean``: ``N(0, 1)``; ``running_var``: ``U(0.5, 2)``; ``num_batches_tracked``: 3.
    """
    for name, p in module.named_parameters():
        values = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name.endswith("weight") and name not in ("mean_weight", "var_weight"):
            values = 1.0 + 0.5 * values
        p.copy_(values.to(p.dtype))
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.dtype))
        elif name.endswith("running_var"):
            b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=gen, dtype=torch.float64))
        elif name.endswith("num_batches_tracked"):
            b.fill_(3)
    return module
