"""Any model: torch.nn norms and their subclasses, functional calls, SyncBatchNorm, mixed
train/eval modes, structured outputs.  Each case checks structure (one node per norm, of the
expected op) and numbers against the original PyTorch model, running statistics included,
over several fed-back steps."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normport import export
from normport.models.randomize import randomize
from tests.onnx_helpers import close, session, top_level_ops

NORM_OPS = {
    "BatchNormalization",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "RMSNormalization",
}


def _norm_nodes(model) -> list[str]:
    return [op for op in top_level_ops(model) if op in NORM_OPS or op.startswith("normport.")]


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():  # norm layers: running statistics or a per-channel weight
        weight = getattr(m, "weight", None)
        per_channel = isinstance(weight, torch.Tensor) and weight.dim() == 1
        if getattr(m, "running_mean", None) is not None or per_channel:
            randomize(m, gen)
    return model


# -- modules as users write them --------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """timm / torchvision ConvNeXt: LayerNorm over C of an (N, C, H, W) input, permuted."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: its own running-statistics bookkeeping, then an activation."""

    def forward(self, x):
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            factor,
            self.eps,
        )
        return F.silu(x)


class GroupNormAct(nn.GroupNorm):
    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class FunctionalNet(nn.Module):
    """Norms called as functions inside one custom module, with the module's own parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8) * 0.2 + 1)
        self.b = nn.Parameter(torch.randn(8) * 0.2)

    def forward(self, x):
        y = self.conv(x)
        y = F.group_norm(y, 4, self.w, self.b, eps=1e-3)
        y = F.instance_norm(y, weight=self.w, bias=self.b, eps=1e-4)
        z = y.permute(0, 2, 3, 1)
        z = F.layer_norm(z, (8,), self.w, self.b, eps=1e-6)
        z = F.rms_norm(z, (8,), self.w, eps=1e-5)
        return z


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct2d(8, momentum=0.3)
        self.ln = LayerNorm2d(8, eps=1e-5)
        self.gn = GroupNormAct(2, 8)
        self.sync = nn.SyncBatchNorm(8, momentum=None)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.sync(self.gn(self.ln(self.bn(self.conv(x))))))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        features = self.stem(x)
        return {"logits": self.head(self.drop(self.block(features))), "features": features}


def adabn(net: nn.Module) -> nn.Module:
    """AdaBN: the model in eval, only its BatchNorm layers in training."""
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return net


def frozen_backbone(net: Backbone) -> Backbone:
    """Fine-tuning: the stem frozen (eval), the rest training, dropout off."""
    net.train()
    net.stem.eval()
    net.drop.eval()
    return net


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _steps(model, net: nn.Module, batches, input_name: str = "x"):
    """Run ``batches`` through onnxruntime (feeding the state back) and through ``net``;
    compare every output and every running statistic after each step."""
    sess = session(model)
    ours = copy.deepcopy(net)
    state_inputs = [i.name for i in model.graph.input if i.name != input_name]
    buffers = dict(ours.named_buffers())
    state = {name: buffers[name].numpy().copy() for name in state_inputs}
    out_names = [o.name for o in sess.get_outputs()]
    for step, x in enumerate(batches):
        got = dict(zip(out_names, sess.run(None, {input_name: x.numpy(), **state}), strict=True))
        with torch.no_grad():
            expected = ours(x)
        if isinstance(expected, torch.Tensor):
            expected = {"output": expected}
        for name, value in expected.items():
            close(got[name], value.numpy(), f"step {step} output {name}", atol=1e-4, rtol=1e-4)
        buffers = dict(ours.named_buffers())
        for name in state_inputs:
            close(got[f"{name}.next"], buffers[name].numpy(), f"step {step} {name}", 1e-5, 1e-5)
            state[name] = got[f"{name}.next"]
    return sess


BATCHES = [torch.randn(b, 3, 6, 6, generator=torch.Generator().manual_seed(b)) for b in (4, 3, 5)]


@pytest.mark.parametrize("opset", [13, 17, 23])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_subclasses_and_sync_batchnorm(mode, opset):
    net = _randomized(SubclassNet()).train(mode == "train")
    model = export.to_onnx(net, X, mode=mode, opset=opset, input_names=["x"])
    assert len(_norm_nodes(model)) == 4
    layers = json.loads({p.key: p.value for p in model.metadata_props}["normalization_layers"])
    assert [(e["path"], e["source"]) for e in layers] == [
        ("bn", "functional"),
        ("ln", "functional"),
        ("gn", "functional"),
        ("sync", "module"),
    ]
    assert ("note" in layers[3]) == (mode == "train")  # SyncBatchNorm over the local batch
    _steps(model, net, BATCHES if mode == "train" else BATCHES[:1])


def test_subclass_train_graph_exposes_the_subclass_state():
    net = _randomized(SubclassNet()).train()
    model = export.to_onnx(net, X, mode="train", opset=23, input_names=["x"])
    assert [i.name for i in model.graph.input] == [
        "x",
        *[name for path in ("bn", "sync") for name, _ in export.state_names(path)],
    ]
    # the module's own num_batches_tracked.add_(1) is replaced by the exported update
    assert top_level_ops(model).count("Add") == 0


@pytest.mark.parametrize("opset", [13, 17, 23])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_functional_calls(mode, opset):
    net = FunctionalNet().train(mode == "train")
    if mode == "train":  # stateless norms only: a train export has nothing to update
        with pytest.raises(ValueError, match="no normalization layer updates running statistics"):
            export.to_onnx(net, X, mode=mode, opset=opset)
        return
    model = export.to_onnx(net, X, mode=mode, opset=opset, input_names=["x"])
    expected = {
        13: [
            "normport.GroupNorm",
            "InstanceNormalization",
            "normport.LayerNorm",
            "normport.RMSNorm",
        ],
        17: [
            "normport.GroupNorm",
            "InstanceNormalization",
            "LayerNormalization",
            "normport.RMSNorm",
        ],
        23: [
            "normport.GroupNorm",  # the onnxruntime target's form at every opset (issue 12)
            "InstanceNormalization",
            "LayerNormalization",
            "RMSNormalization",
        ],
    }[opset]
    assert _norm_nodes(model) == expected
    _steps(model, net, BATCHES[:2])


@pytest.mark.parametrize("recipe", [adabn, frozen_backbone])
def test_mixed_modes(recipe):
    net = recipe(_randomized(Backbone()))
    model = export.to_onnx(net, X, mode="train", opset=23, input_names=["x"])
    training = [
        path
        for path, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    assert [i.name for i in model.graph.input] == [
        "x",
        *[name for path in training for name, _ in export.state_names(path)],
    ]
    assert "Dropout" not in top_level_ops(model)
    _steps(model, net, BATCHES)


def test_adabn_stateful_layer_called_twice_raises():
    class Twice(Backbone):  # the same input twice: torch.onnx would merge the two calls
        def forward(self, x):
            return self.stem(x) + self.stem(x)

    with pytest.raises(
        ValueError, match=r"layer 'stem.1' \(BatchNorm2d\) is called more than once"
    ):
        export.to_onnx(adabn(_randomized(Twice())), X, mode="train")


def test_eval_mode_still_requires_every_module_in_eval():
    net = frozen_backbone(_randomized(Backbone()))
    with pytest.raises(ValueError, match=r"mode='eval' but \d+ module\(s\) are in training mode"):
        export.to_onnx(net, X, mode="eval")


def test_structured_outputs_are_named_after_their_keys():
    net = _randomized(Backbone()).eval()
    model = export.to_onnx(net, X, mode="eval", opset=23, input_names=["x"])
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    _steps(model, net, BATCHES[:1])


# -- near misses: what must not pass silently ----------------------------------------------------


class HandUpdatedStats(nn.Module):
    """Running statistics updated by hand: not a recognised form, so a train export raises
    rather than dropping the update (torch.onnx drops buffer mutations)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x):
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * x.mean((0, 2, 3)).detach())
        return self.bn(x)


def test_hand_written_state_update_raises():
    with pytest.raises(ValueError, match=r"buffer 'ema' is updated in place .* would be lost"):
        export.to_onnx(HandUpdatedStats().train(), X, mode="train")


class StatsNotBuffers(nn.Module):
    """F.batch_norm in training on plain tensors: there is no module state to expose."""

    def forward(self, x):
        mean, var = torch.zeros(3), torch.ones(3)
        return F.batch_norm(x, mean, var, training=True)


def test_functional_running_stats_that_are_not_buffers_raise():
    with pytest.raises(ValueError, match="running statistics that are not module buffers"):
        export.to_onnx(StatsNotBuffers().train(), X, mode="train")


def test_local_response_norm_is_not_a_norm_node():
    net = nn.Sequential(nn.LocalResponseNorm(2), nn.BatchNorm2d(3)).eval()
    model = export.to_onnx(net, X, mode="eval", strict=False)
    assert _norm_nodes(model) == ["BatchNormalization"]
    unrecognized = json.loads(
        {p.key: p.value for p in model.metadata_props}["normport.unrecognized"]
    )
    assert [e["path"] for e in unrecognized] == ["0"]
    np.testing.assert_allclose(
        session(model).run(None, {"input": X.numpy()})[0],
        net(X).detach().numpy(),
        atol=1e-5,
    )
