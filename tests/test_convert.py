"""models.convert: every normalization layer swapped for its twin, state and flags preserved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normport import models
from normport.models.randomize import randomize
from tests.cases import TWIN_CASES, LayerCase, ids, make_input


def _net(case: LayerCase, train: bool) -> nn.Module:
    """A model with the layer nested two levels deep, next to a non-norm sibling."""
    layer, _ = case.build()
    randomize(layer, torch.Generator().manual_seed(5))
    net = nn.Sequential(nn.Identity(), nn.ModuleDict({"inner": nn.Sequential(layer)}))
    net.train(not train)
    layer.train(train)  # a flag that differs from its parent's must survive too
    return net


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net[1]["inner"](net[0](x))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", TWIN_CASES, ids=ids(TWIN_CASES))
def test_round_trip_keeps_outputs_state_and_flags(case: LayerCase, train: bool):
    ours = _net(case, train)
    theirs = models.convert(ours, to="torch")
    back = models.convert(theirs, to="normport")
    assert type(theirs[1]["inner"][0]) is case.twin
    assert type(back[1]["inner"][0]) is case.ours
    assert type(ours[1]["inner"][0]) is case.ours, "convert must not modify its argument"
    for net in (theirs, back):
        assert [m.training for m in net.modules()] == [m.training for m in ours.modules()]
        for (k, a), (_, b) in zip(net.state_dict().items(), ours.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
    gen = torch.Generator().manual_seed(6)
    x = make_input(case.shapes[0], gen, torch.float64).float()
    outs = [_forward(net, x) for net in (ours, theirs, back)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=0, rtol=0)
    for (k, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=k)


def test_dtype_is_preserved():
    layer = models.LayerNorm(8).to(torch.float64)
    assert models.convert(layer, to="torch").weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("model", "to", "path", "cls"),
    [
        (
            nn.Sequential(nn.Linear(3, 3), models.SwitchableNorm1d(3)),
            "torch",
            "1",
            "SwitchableNorm1d",
        ),
        (
            nn.Sequential(nn.Sequential(models.SwitchableNorm2d(3))),
            "torch",
            "0.0",
            "SwitchableNorm2d",
        ),
        (nn.Sequential(nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3)), "normport", "1", "SyncBatchNorm"),
        (nn.ModuleDict({"lrn": nn.LocalResponseNorm(2)}), "normport", "lrn", "LocalResponseNorm"),
        (models.SwitchableNorm2d(3), "torch", "<root>", "SwitchableNorm2d"),
    ],
)
def test_layer_without_twin_raises_naming_its_path(model, to, path, cls):
    with pytest.raises(
        ValueError, match=rf"cannot convert '{path}' \(.*{cls}\) to {to}: it has no {to} twin"
    ):
        models.convert(model, to=to)


def test_subclass_of_a_torch_norm_is_not_silently_treated_as_the_base():
    class MyBN(nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match=r"cannot convert '0' \(.*MyBN\) to normport"):
        models.convert(nn.Sequential(MyBN(3)), to="normport")
