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

from torch import nn

from normport.models.batchnorm import TorchSequenceBatchNorm
from normport.models.table import LAYERS, NORMPORT_NORMS, TORCH_NORMS

__all__ = ["TORCH_NORMS", "TorchSequenceBatchNorm", "convert"]

_TO_TORCH = {row.normport: row.torch for row in LAYERS if row.torch is not None}
_TO_NORMPORT = {row.torch: row.normport for row in LAYERS if row.torch is not None}

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
    table, family = (_TO_TORCH, NORMPORT_NORMS) if to == "torch" else (_TO_NORMPORT, TORCH_NORMS)
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
