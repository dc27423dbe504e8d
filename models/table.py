"""The one table of normalization layers: convert, export, verify, the zoo and the tests read it.

Each row names a normport layer, its torch.nn twin (if any) and the *kind* its export lowering
is registered under (:mod:`export.lowerings`).  torch.nn layers without a normport twin that
normport still exports as one node (``SyncBatchNorm``) are listed in :data:`TORCH_ONLY`.

A module is exported at module level (its ``forward`` replaced by one placeholder call, so its
exact state semantics, momentum=None included, are known) when it is an instance of a row's
class and still runs that class's own ``forward``.  A subclass that overrides ``forward``
(timm's ``LayerNorm2d``, ``BatchNormAct2d``, ...) is left to run its own code, and the
normalization *inside* it is found on the traced graph (:mod:`export.recognize`).

Adding a layer: a row here and a lowering registered under its kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from normport.models import batchnorm, groupnorm, instancenorm, layernorm, switchable

__all__ = [
    "LAYERS",
    "NORMPORT_NORMS",
    "TORCH_NORMS",
    "TORCH_ONLY",
    "LayerRow",
    "kind_of",
    "normport_types",
    "row_of",
]


@dataclass(frozen=True)
class LayerRow:
    """One normalization layer.

    Attributes:
        kind: the lowering kind (``export.lowerings`` registry key).
        normport: normport's class.
        torch: the torch.nn twin (``models.convert`` maps between them), or None.
    """

    kind: str
    normport: type[nn.Module]
    torch: type[nn.Module] | None

    @property
    def name(self) -> str:
        return self.normport.__name__


LAYERS: tuple[LayerRow, ...] = (
    LayerRow("batchnorm", batchnorm.BatchNorm1d, nn.BatchNorm1d),
    LayerRow("batchnorm", batchnorm.BatchNorm2d, nn.BatchNorm2d),
    LayerRow("batchnorm", batchnorm.BatchNorm3d, nn.BatchNorm3d),
    LayerRow("sequence_batchnorm", batchnorm.SequenceBatchNorm, batchnorm.TorchSequenceBatchNorm),
    LayerRow("instancenorm", instancenorm.InstanceNorm1d, nn.InstanceNorm1d),
    LayerRow("instancenorm", instancenorm.InstanceNorm2d, nn.InstanceNorm2d),
    LayerRow("instancenorm", instancenorm.InstanceNorm3d, nn.InstanceNorm3d),
    LayerRow("groupnorm", groupnorm.GroupNorm, nn.GroupNorm),
    LayerRow("layernorm", layernorm.LayerNorm, nn.LayerNorm),
    LayerRow("rmsnorm", layernorm.RMSNorm, nn.RMSNorm),
    LayerRow("switchable", switchable.SwitchableNorm1d, None),
    LayerRow("switchable", switchable.SwitchableNorm2d, None),
)

# torch.nn layers exported at module level with no normport twin: (class, kind).
# SyncBatchNorm in one process normalizes over the local batch, which is BatchNorm.
TORCH_ONLY: tuple[tuple[type[nn.Module], str], ...] = ((nn.SyncBatchNorm, "batchnorm"),)

# Every normport normalization family (base classes included, for isinstance checks).
NORMPORT_NORMS: tuple[type[nn.Module], ...] = (
    batchnorm._BatchNorm,
    instancenorm._InstanceNorm,
    switchable._SwitchableNorm,
    groupnorm.GroupNorm,
    layernorm._TrailingNorm,
)

# torch.nn's normalization layers, those normport cannot export as one node included
# (LocalResponseNorm): converting or exporting them must never pass silently.
TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
)


def normport_types() -> tuple[type[nn.Module], ...]:
    """Every concrete normport layer class, in table order."""
    return tuple(row.normport for row in LAYERS)


def row_of(module: nn.Module) -> LayerRow | None:
    """The row of a normport layer (by isinstance), None for anything else."""
    for row in LAYERS:
        if isinstance(module, row.normport):
            return row
    return None


def _module_level_torch() -> tuple[tuple[type[nn.Module], str], ...]:
    return (*TORCH_ONLY, *((row.torch, row.kind) for row in LAYERS if row.torch is not None))


def kind_of(module: nn.Module) -> str | None:
    """The lowering kind of a module exported at module level, None for any other module.

    normport layers always; a torch.nn layer (or subclass) only while it runs its class's own
    ``forward`` (an overridden ``forward`` is traced, and its norm found on the graph).
    """
    row = row_of(module)
    if row is not None:
        return row.kind
    for cls, kind in _module_level_torch():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return kind
    return None
