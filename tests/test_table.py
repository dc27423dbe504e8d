"""The one layer table: complete, consistent with the lowerings, and module-level only where
the layer still runs its class's own forward."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normport import models
from normport.export.lowerings import REGISTRY
from normport.models import table


def _normport_layers() -> set[type]:
    return {
        obj
        for name in models.__all__
        if inspect.isclass(obj := getattr(models, name)) and issubclass(obj, table.NORMPORT_NORMS)
    }


def test_every_normport_layer_has_one_row():
    assert set(table.normport_types()) == _normport_layers()
    assert len(table.normport_types()) == len(set(table.normport_types()))


@pytest.mark.parametrize("row", table.LAYERS, ids=lambda r: r.name)
def test_every_kind_has_a_lowering(row):
    assert row.kind in REGISTRY


@pytest.mark.parametrize("row", [r for r in table.LAYERS if r.torch], ids=lambda r: r.name)
def test_twins_share_constructor_arguments(row):
    ours = set(inspect.signature(row.normport.__init__).parameters) - {"self", "device", "dtype"}
    theirs = set(inspect.signature(row.torch.__init__).parameters) - {"self", "device", "dtype"}
    assert ours <= theirs | {"bias"}, (row.name, ours - theirs)


class _SameForward(nn.LayerNorm):
    """A subclass that keeps torch.nn's forward: exported at module level."""


class _OwnForward(nn.LayerNorm):
    """timm's LayerNorm2d shape: permute around F.layer_norm; found on the graph instead."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (models.BatchNorm2d(3), "batchnorm"),
        (models.SequenceBatchNorm(3), "sequence_batchnorm"),
        (models.SwitchableNorm2d(3), "switchable"),
        (nn.BatchNorm2d(3), "batchnorm"),
        (nn.SyncBatchNorm(3), "batchnorm"),
        (nn.InstanceNorm1d(3), "instancenorm"),
        (nn.RMSNorm(3), "rmsnorm"),
        (models.TorchSequenceBatchNorm(3), "sequence_batchnorm"),
        (_SameForward(3), "layernorm"),
        (_OwnForward(3), None),  # near miss: an overridden forward is not assumed to normalize
        (nn.LocalResponseNorm(2), None),
        (nn.Linear(3, 3), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_kind_of(module, kind):
    assert table.kind_of(module) == kind


def test_torch_sequence_batchnorm_is_the_transposed_batchnorm():
    torch.manual_seed(0)
    ours, theirs = models.TorchSequenceBatchNorm(5), nn.BatchNorm1d(5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 7, 5)
    torch.testing.assert_close(ours(x), theirs(x.transpose(1, 2)).transpose(1, 2))
