"""Swap every normalization submodule of a model for its twin (normport <-> torch.nn).

``convert(model, to="torch")`` returns a deep copy in which each normport layer is the
matching torch.nn module, carrying the same weights, buffers, dtype, device and train/eval
flag; ``to="normport"`` goes the other way.  A normalization layer with no twin (for example
:class:`~models.SwitchableNorm2d` going to torch, or ``nn.SyncBatchNorm`` coming from it)
raises, naming its path in the model: nothing is left silently unconverted.
"""

from __future__ import annotations

import copy
import inspect
from typing import Literal

import torch
from torch import nn

from models import batchnorm, groupnorm, instancenorm, layernorm, switchable

__all__ = ["TORCH_NORMS", "TorchSequenceBatchNorm", "convert"]


class TorchSequenceBatchNorm(nn.BatchNorm1d):
    """torch.nn's own BatchNorm1d applied to a channel-last ``(N, L, C)`` input.

    The torch-side twin of :class:`models.SequenceBatchNorm` (same arguments and state).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 3:
            raise ValueError(f"expected 3D input (got {input.dim()}D input)")
        return super().forward(input.transpose(1, 2)).transpose(1, 2)


_PAIRS: list[tuple[type[nn.Module], type[nn.Module]]] = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d),
    (batchnorm.SequenceBatchNorm, TorchSequenceBatchNorm),
    (instancenorm.InstanceNorm1d, nn.InstanceNorm1d),
    (instancenorm.InstanceNorm2d, nn.InstanceNorm2d),
    (instancenorm.InstanceNorm3d, nn.InstanceNorm3d),
    (groupnorm.GroupNorm, nn.GroupNorm),
    (layernorm.LayerNorm, nn.LayerNorm),
    (layernorm.RMSNorm, nn.RMSNorm),
]
_TO_TORCH = {ours: theirs for ours, theirs in _PAIRS}
_TO_NORMPORT = {theirs: ours for ours, theirs in _PAIRS}

# Normalization families with no twin on the other side: converting them must not pass silently.
_NORMPORT_NORMS: tuple[type[nn.Module], ...] = (
    batchnorm._BatchNorm,
    instancenorm._InstanceNorm,
    switchable._SwitchableNorm,
    groupnorm.GroupNorm,
    layernorm._TrailingNorm,
)
# torch.nn's normalization layers (those without a normport twin included): converting or
# exporting them must never pass silently.
TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
)

# Constructor arguments of every twin, read off the module (the names are shared).
_ARGS = (
    "num_features",
    "num_groups",
    "num_channels",
    "normalized_shape",
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "elementwise_affine",
)


def _twin_of(module: nn.Module, to: str) -> type[nn.Module] | None:
    table, family = (_TO_TORCH, _NORMPORT_NORMS) if to == "torch" else (_TO_NORMPORT, TORCH_NORMS)
    twin = table.get(type(module))
    if twin is None and isinstance(module, family):
        return None
    return twin or nn.Module  # nn.Module: not a normalization layer, leave it alone


def _build_twin(module: nn.Module, twin: type[nn.Module]) -> nn.Module:
    params = inspect.signature(twin.__init__).parameters
    kwargs = {name: getattr(module, name) for name in _ARGS if name in params}
    if "bias" in params:  # LayerNorm(bias=...): a flag in the constructor, a tensor on the module
        kwargs["bias"] = getattr(module, "bias", None) is not None
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    floats = [t for t in tensors if t.is_floating_point()]
    ref = floats[0] if floats else None
    new = twin(
        **kwargs,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    new.load_state_dict(module.state_dict(), strict=True)
    new.train(module.training)
    return new


def convert(module: nn.Module, to: Literal["normport", "torch"] = "normport") -> nn.Module:
    """A deep copy of ``module`` with every normalization layer replaced by its twin.

    Args:
        module: any model (or a single normalization layer).
        to: ``"torch"`` for torch.nn layers, ``"normport"`` for normport's.

    Raises:
        ValueError: ``to`` is neither, or a normalization layer has no twin (its path is named).
    """
    if to not in ("normport", "torch"):
        raise ValueError(f"to must be 'normport' or 'torch', got {to!r}")
    root = copy.deepcopy(module)
    if (twin := _twin_of(root, to)) is not nn.Module:
        return _swap(root, twin, "<root>", to)
    for path, child in list(root.named_modules()):
        for name, sub in list(child.named_children()):
            twin = _twin_of(sub, to)
            if twin is nn.Module:
                continue
            full = f"{path}.{name}" if path else name
            setattr(child, name, _swap(sub, twin, full, to))
    return root


def _swap(module: nn.Module, twin: type[nn.Module] | None, path: str, to: str) -> nn.Module:
    if twin is None:
        raise ValueError(
            f"cannot convert {path!r} ({type(module).__module__}.{type(module).__qualname__}) "
            f"to {to}: it has no {to} twin"
        )
    return _build_twin(module, twin)
