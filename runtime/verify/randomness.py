"""Random ops in training mode: set the known ones to eval, detect the others.

A train-mode comparison needs both sides deterministic.  Dropout draws a fresh mask per call,
so PyTorch and onnxruntime can never agree on it: :func:`freeze_random` sets every
``torch.nn.modules.dropout._DropoutNd`` (``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
``FeatureAlphaDropout``) and timm's ``DropPath`` (matched by class name: timm is optional) to
eval, which the export in train mode lowers to the identity (README "Modes").  Any other random
op (``torch.rand`` inside a forward, ``F.dropout(training=True)``) is found by
:func:`draws_random`: two train-mode passes over the same batch under different seeds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from normport.export.outputs import named_leaves

__all__ = ["RANDOM_CLASS_NAMES", "draws_random", "freeze_random", "random_modules", "train_mode"]

RANDOM_CLASS_NAMES = ("DropPath",)  # timm's stochastic depth


def random_modules(module: nn.Module) -> list[str]:
    """Module paths of the random layers :func:`freeze_random` sets to eval."""
    return [
        path
        for path, m in module.named_modules()
        if isinstance(m, _DropoutNd) or type(m).__name__ in RANDOM_CLASS_NAMES
    ]


def freeze_random(module: nn.Module) -> nn.Module:
    """Set every random layer of ``module`` to eval, in place; returns ``module``."""
    paths = set(random_modules(module))
    for path, m in module.named_modules():
        if path in paths:
            m.eval()
    return module


def train_mode(module: nn.Module) -> nn.Module:
    """``module.train()`` with its random layers in eval: the train mode verify compares."""
    return freeze_random(module.train())


def draws_random(make: Callable[[], nn.Module], inputs: tuple[Tensor, ...]) -> str | None:
    """Whether ``train_mode(make())`` still draws random numbers: two passes over ``inputs``
    under seeds 1 and 2 (each on a fresh module: a train pass moves running statistics).

    Returns:
        None when both passes agree exactly, else the first output leaf that differs.
    """
    outs = []
    rng = torch.random.get_rng_state()
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            with torch.no_grad():
                outs.append(named_leaves(train_mode(make())(*copy.deepcopy(inputs))))
    finally:
        torch.random.set_rng_state(rng)
    first, second = outs
    for name, value in first.items():
        if not torch.equal(value, second[name]):
            return name
    return None
