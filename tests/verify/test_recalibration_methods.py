"""``precise`` and ``ema`` recalibration on onnxruntime equal their PyTorch oracles.

precise: ``torch.optim.swa_utils.update_bn`` for BatchNorm; for tracked InstanceNorm and
SwitchableNorm (which update_bn does not touch) the same recipe by hand: reset, then weight
batch ``k`` by ``1/k`` (momentum ``1/k`` per step: torch.nn's InstanceNorm takes
``momentum=None`` as "never move", so ``None`` is not that recipe there).
ema: the PyTorch module run over the batches in train mode, from its own or reset statistics.
Both compared on held-out outputs of the eval graph *and* on the statistics themselves (the
eval graph's initializers, and num_batches_tracked from :func:`recalibrated_statistics`).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from normport import export, models, runtime
from normport.runtime.recalibration import RecalibrationWarning, recalibrated_statistics
from normport.runtime.sessions import cpu_session as session

SIZES = (5, 2, 7, 3)  # batch sizes, deliberately unequal


def _randomize(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every norm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "running_mean", None) is None:
                continue
            c = m.running_mean.shape[0]
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.num_batches_tracked.fill_(7)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return net


class _BatchNorms(nn.Module):
    """Three BatchNorm layers with momentum 0.1, 0.3 and None (cumulative)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.bn1 = nn.BatchNorm2d(6, momentum=0.1)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.bn2 = nn.BatchNorm2d(8, momentum=0.3)
        self.fc = nn.Linear(8, 5)
        self.bn3 = nn.BatchNorm1d(5, momentum=None)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(image)))
        x = torch.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3))
        return self.bn3(self.fc(x))


class _Tracked(nn.Module):
    """Tracked InstanceNorm (momentum 0.2, and None: frozen in torch.nn) and SwitchableNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.in1 = nn.InstanceNorm2d(6, affine=True, track_running_stats=True, momentum=0.2)
        self.conv2 = nn.Conv2d(6, 6, 3)
        self.in2 = nn.InstanceNorm2d(6, affine=True, track_running_stats=True, momentum=None)
        self.sn = models.SwitchableNorm2d(6, momentum=0.1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.in1(self.conv1(image)))
        return self.sn(torch.relu(self.in2(self.conv2(x))))


NETS = {"batchnorm": _BatchNorms, "tracked": _Tracked}


def _net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    net = _randomize(NETS[kind](), seed=1)
    if kind == "tracked":
        with torch.no_grad():  # a mix that really uses every branch
            net.sn.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
            net.sn.var_weight.copy_(torch.tensor([-0.1, 0.4, 0.2]))
    return net


@functools.cache
def _train_model(kind: str) -> onnx.ModelProto:
    return export.to_onnx(
        _net(kind).train(), torch.randn(4, 3, 9, 9), mode="train", opset=23, input_names=["image"]
    )


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 9, 9, generator=g) * 1.7 + 0.6 for n in SIZES]


def _norms(net: nn.Module) -> dict[str, nn.Module]:
    return {k: m for k, m in net.named_modules() if getattr(m, "running_mean", None) is not None}


def _equal_weight_by_hand(net: nn.Module, batches) -> None:
    """Reset, then batch k gets momentum 1/k: the plain mean over batches, for any layer."""
    norms = _norms(net)
    for m in norms.values():
        m.reset_running_stats()
    net.train()
    with torch.no_grad():
        for k, batch in enumerate(batches, start=1):
            for m in norms.values():
                m.momentum = 1.0 / k
            net(batch)


def _compare(ours: onnx.ModelProto, state: dict, net: nn.Module) -> None:
    net.eval()
    x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = net(x).numpy()
    got = session(ours).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
    for path, m in _norms(net).items():
        for stat in ("running_mean", "running_var"):
            buffer = getattr(m, stat).numpy()
            key = f"{path}.{stat}"
            np.testing.assert_allclose(initializers[key], buffer, atol=1e-5, rtol=1e-5, err_msg=key)
            np.testing.assert_allclose(state[key], buffer, atol=1e-5, rtol=1e-5, err_msg=key)
        key = f"{path}.num_batches_tracked"
        assert int(state[key]) == int(m.num_batches_tracked), key


def test_precise_is_update_bn():
    net = _net("batchnorm")
    batches = _batches()
    torch.optim.swa_utils.update_bn(batches, net)
    assert [m.momentum for m in _norms(net).values()] == [0.1, 0.3, None]  # restored
    data = [b.numpy() for b in batches]
    ours = runtime.recalibrate(_train_model("batchnorm"), data)  # precise is the default
    state, count = recalibrated_statistics(_train_model("batchnorm"), data)
    assert count == len(SIZES)
    assert {p.key: p.value for p in ours.metadata_props}["recalibration_method"] == "precise"
    _compare(ours, state, net)


def test_precise_equal_weight_for_instancenorm_and_switchable():
    net = _net("tracked")
    batches = _batches()
    _equal_weight_by_hand(net, batches)
    data = [b.numpy() for b in batches]
    ours = runtime.recalibrate(_train_model("tracked"), data, method="precise")
    state, _ = recalibrated_statistics(_train_model("tracked"), data, method="precise")
    _compare(ours, state, net)  # InstanceNorm's count stays 0, SwitchableNorm's is K


@pytest.mark.parametrize("kind", sorted(NETS))
def test_ema_is_pytorch_train_mode(kind):
    net = _net(kind).train()
    batches = _batches()
    with torch.no_grad():
        for batch in batches:
            net(batch)
    data = [b.numpy() for b in batches]
    ours = runtime.recalibrate(_train_model(kind), data, method="ema")
    state, _ = recalibrated_statistics(_train_model(kind), data, method="ema")
    _compare(ours, state, net)


def test_ema_from_reset_is_reset_running_stats_and_says_how_little_data_it_holds():
    net = _net("batchnorm")
    for m in _norms(net).values():
        m.reset_running_stats()
    net.train()
    batches = _batches()
    with torch.no_grad():
        for batch in batches:
            net(batch)
    data = [b.numpy() for b in batches]
    with pytest.warns(RecalibrationWarning) as caught:
        ours = runtime.recalibrate(_train_model("batchnorm"), data, method="ema", reset_stats=True)
        state, _ = recalibrated_statistics(
            _train_model("batchnorm"), data, reset_stats=True, method="ema"
        )
    _compare(ours, state, net)
    message = str(caught[0].message)
    # 1 - 0.9^4 = 0.34, 1 - 0.7^4 = 0.76; momentum None (cumulative) carries all of the data.
    assert (
        "momentum 0.1 over 4 batch(es): the statistics carry 34% of the data's mean and 66% "
        "of the reset values" in message
    )
    assert "momentum 0.3 over 4 batch(es): the statistics carry 76% of the data's mean" in message
    assert message.count("momentum") == 2 and "use --method precise" in message


def test_precise_ignores_the_exported_statistics():
    """Same data, wildly different exported statistics and counts: the same result."""
    net = _net("batchnorm")
    with torch.no_grad():
        for m in _norms(net).values():
            m.running_mean.fill_(1e4)
            m.running_var.fill_(1e-6)
            m.num_batches_tracked.fill_(123456)
    other = export.to_onnx(
        net.train(), torch.randn(4, 3, 9, 9), mode="train", opset=23, input_names=["image"]
    )
    data = [b.numpy() for b in _batches()]
    ref, _ = recalibrated_statistics(_train_model("batchnorm"), data)
    got, _ = recalibrated_statistics(other, data)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_precise_on_a_cumulative_only_model_emits_the_momentum_function():
    """A model whose layers are all momentum=None has no BatchNormTrain function to reuse."""
    net = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)), 2)
    train = export.to_onnx(net.train(), torch.randn(2, 3, 9, 9), mode="train", opset=13)
    assert {f.name for f in train.functions} == {"BatchNormTrainCumulative"}
    batches = _batches()
    torch.optim.swa_utils.update_bn(batches, net)
    state, _ = recalibrated_statistics(train, [b.numpy() for b in batches])
    np.testing.assert_allclose(state["1.running_var"], net[1].running_var.numpy(), rtol=1e-5)
    np.testing.assert_allclose(state["1.running_mean"], net[1].running_mean.numpy(), atol=1e-6)
    assert int(state["1.num_batches_tracked"]) == len(SIZES)


def test_float64_data_is_cast_like_float32():
    data = [b.numpy() for b in _batches()]
    ref, _ = recalibrated_statistics(_train_model("batchnorm"), data)
    got, _ = recalibrated_statistics(
        _train_model("batchnorm"), [d.astype(np.float64) for d in data]
    )
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of precise, ema, got 'swa'"):
        runtime.recalibrate(copy.deepcopy(_train_model("batchnorm")), [], method="swa")
