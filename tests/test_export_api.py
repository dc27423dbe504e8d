"""export.to_onnx / export.save: errors, metadata, determinism, dtypes, inlining, atomic save."""

from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from normport import export, models
from normport.models.randomize import randomize
from tests.onnx_helpers import close, session
from tests.test_export import reference


def _net(train: bool = False) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), models.BatchNorm2d(8), nn.ReLU(), models.GroupNorm(2, 8)
    )
    for i, layer in enumerate((net[1], net[3])):
        randomize(layer, torch.Generator().manual_seed(i))
    return net.train(train)


class _Causal(nn.Module):
    def forward(self, x):
        return torch.triu(x)  # ONNX Trilu exists from opset 14


X = torch.randn(2, 3, 10, 10)

ERRORS = [
    (
        "opset_low",
        lambda: export.to_onnx(_net(), X, mode="eval", opset=12),
        ValueError,
        r"unsupported opset 12: normport exports opsets 13 to 28",
    ),
    (
        "opset_high",
        lambda: export.to_onnx(_net(), X, mode="eval", opset=29),
        ValueError,
        r"unsupported opset 29: normport exports opsets 13 to 28",
    ),
    (
        "opset_type",
        lambda: export.to_onnx(_net(), X, mode="eval", opset="23"),
        TypeError,
        r"opset must be an int in \[13, 28\], got '23'",
    ),
    (
        "dtype",
        lambda: export.to_onnx(_net(), X, mode="eval", dtype=torch.int32),
        ValueError,
        r"unsupported dtype torch.int32: expected None or one of torch.float32",
    ),
    (
        "mode",
        lambda: export.to_onnx(_net(), X, mode="inference"),
        ValueError,
        r"mode must be 'eval' or 'train', got 'inference'",
    ),
    (
        "mode_disagrees_eval",
        lambda: export.to_onnx(_net(train=True), X, mode="eval"),
        ValueError,
        r"mode='eval' but 5 module\(s\) are in training mode \(<root>, 0, 1, 2, 3\); call module.eval\(\)",
    ),
    (
        "mode_disagrees_one_layer",
        lambda: export.to_onnx(_one_layer_in_train(), X, mode="eval"),
        ValueError,
        r"mode='eval' but 1 module\(s\) are in training mode \(1\)",
    ),
    (
        "strict_torch_norm",
        lambda: export.to_onnx(
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(2)).eval(), X, mode="eval"
        ),
        ValueError,
        r"'1' \(LocalResponseNorm\) is a torch.nn normalization layer that normport cannot export as one node",
    ),
    (
        "train_without_stateful_layer",
        lambda: export.to_onnx(
            nn.Sequential(nn.Linear(10, 10), nn.LayerNorm(10)).train(), X, mode="train"
        ),
        ValueError,
        r"mode='train' but no normalization layer updates running statistics in this forward \(1 normalization\(s\) found",
    ),
    (
        "train_one_value_per_channel",
        lambda: export.to_onnx(models.BatchNorm1d(3).train(), torch.randn(1, 3), mode="train"),
        ValueError,
        r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)",
    ),
    (
        "opset_cannot_be_met",
        lambda: export.to_onnx(_Causal().eval(), torch.randn(2, 4, 4), mode="eval", opset=13),
        export.OpsetError,
        r"opset 13 cannot be met: node '.*' \(Trilu\) needs opset 14 or newer",
    ),
    (
        "unbatched_instance_norm",
        lambda: export.to_onnx(
            models.InstanceNorm1d(3).eval(), torch.randn(3, 5), mode="eval", dynamic=False
        ),
        ValueError,
        r"cannot export '' \(InstanceNorm1d\) on a 2D input: ONNX's instance normalization needs a batched",
    ),
    (
        "bfloat16_conv_below_22",
        lambda: export.to_onnx(_net(), X, mode="eval", opset=18, dtype=torch.bfloat16),
        ValueError,
        r"the exported graph fails onnx's checks at opset 18: .*Conv.*bfloat16",
    ),
    (
        "stateful_layer_called_twice",
        lambda: export.to_onnx(_Twice().train(), torch.randn(3, 4), mode="train"),
        ValueError,
        r"layer 'bn' \(BatchNorm1d\) is called more than once in one forward",
    ),
    (
        "target",
        lambda: export.to_onnx(_net(), X, mode="eval", target="tensorrt"),
        ValueError,
        r"unknown export target 'tensorrt': expected one of 'onnxruntime', 'standard'",
    ),
    (
        "dynamic_unknown_input",
        lambda: export.to_onnx(_net(), X, mode="eval", dynamic={"image": {0: "batch"}}),
        ValueError,
        r"dynamic names unknown inputs \['image'\]; inputs: \['input'\]",
    ),
]


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = models.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.bn(x))


def _one_layer_in_train() -> nn.Module:
    net = _net()
    net[1].train()
    return net


@pytest.mark.parametrize(
    ("call", "exc", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_non_strict_lets_unrecognized_norms_through():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(2), nn.LayerNorm(10)).eval()
    randomize(net[2], torch.Generator().manual_seed(6))
    model = export.to_onnx(net, X, mode="eval", strict=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert [e["path"] for e in json.loads(meta["normport.unrecognized"])] == ["1"]
    assert [e["path"] for e in json.loads(meta["normalization_layers"])] == ["2"]
    with torch.no_grad():
        close(session(model).run(None, {"input": X.numpy()})[0], net(X).numpy(), "non-strict")


def test_metadata_and_node_names():
    net = _net()
    model = export.to_onnx(net, X, mode="eval", opset=21)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["mode"] == "eval" and meta["opset"] == "21" and meta["dtype"] == "torch.float32"
    assert meta["target"] == "onnxruntime"
    assert meta["source_class"] == "torch.nn.modules.container.Sequential"
    assert meta["torch_version"] == torch.__version__ and meta["onnx_version"] == onnx.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])
    # GroupNorm: the onnxruntime target's function even where GroupNormalization-21 exists
    assert [(e["path"], e["cls"], e["node"]) for e in json.loads(meta["normalization_layers"])] == [
        ("1", "BatchNorm2d", "BatchNormalization"),
        ("3", "GroupNorm", "normport.GroupNorm"),
    ]
    assert [n.name for n in model.graph.node] == [
        "0/Conv",
        "1/BatchNormalization",
        "2/Relu",
        "3/GroupNorm",
    ]
    standard = export.to_onnx(net, X, mode="eval", opset=21, target="standard")
    assert [n.name for n in standard.graph.node] == [
        "0/Conv",
        "1/BatchNormalization",
        "2/Relu",
        "3/GroupNormalization",
    ]
    assert {p.key: p.value for p in standard.metadata_props}["target"] == "standard"
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed[1].running_var[0] += 1.0
    other = {
        p.key: p.value for p in export.to_onnx(changed, X, mode="eval", opset=21).metadata_props
    }
    assert other["weights_sha256"] != meta["weights_sha256"]


def test_same_module_gives_byte_identical_files():
    net = _net()
    net.train()
    first = export.to_onnx(net, X, mode="train").SerializeToString()
    assert export.to_onnx(net, X, mode="train").SerializeToString() == first


def test_float16_export_computes_statistics_in_float32():
    net = nn.Sequential(models.LayerNorm(64), models.BatchNorm1d(5)).eval()
    for layer in net:
        randomize(layer, torch.Generator().manual_seed(3))
    x = 40 + 10 * torch.randn(4, 5, 64)
    model = export.to_onnx(net, x, mode="eval", dtype=torch.float16)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    assert {a.name: a.i for a in ln.attribute}["stash_type"] == 1
    out = session(model).run(None, {"input": x.half().numpy()})[0]
    with torch.no_grad():
        expected = net.double()(x.half().double())
    close(
        out.astype(np.float64), expected.numpy(), "float16 vs float64 PyTorch", atol=2e-2, rtol=1e-2
    )


def test_bfloat16_export_runs_in_the_reference_evaluator():
    layer = models.LayerNorm(16).eval()
    randomize(layer, torch.Generator().manual_seed(4))
    x = torch.randn(3, 16)
    model = export.to_onnx(layer, x, mode="eval", dtype=torch.bfloat16)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    onnx.checker.check_model(model, full_check=True)
    feeds = {
        "input": x.to(torch.bfloat16)
        .float()
        .numpy()
        .astype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16))
    }
    out = np.asarray(reference(model).run(None, feeds)[0], dtype=np.float32)
    with torch.no_grad():
        expected = layer.double()(x.to(torch.bfloat16).double())
    close(out, expected.float().numpy(), "bfloat16", atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("opset", [13, 18])
def test_inline_gives_the_same_numbers_without_functions(opset):
    net = nn.Sequential(models.GroupNorm(2, 6), models.SwitchableNorm2d(6)).eval()
    for layer in net:
        randomize(layer, torch.Generator().manual_seed(5))
    x = torch.randn(2, 6, 5, 5)
    plain = export.to_onnx(net, x, mode="eval", opset=opset)
    inlined = export.to_onnx(net, x, mode="eval", opset=opset, inline=True)
    assert plain.functions and not inlined.functions
    assert {o.domain for o in inlined.opset_import} == {""}
    assert not any(n.domain for n in inlined.graph.node)
    feeds = {"input": x.numpy()}
    close(
        session(inlined).run(None, feeds)[0],
        session(plain).run(None, feeds)[0],
        "inline",
        atol=1e-6,
        rtol=1e-6,
    )


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m" / "model.onnx"
    model = export.to_onnx(_net(), X, mode="eval")
    export.save(model, path)
    assert path.read_bytes() == model.SerializeToString()
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    other = export.to_onnx(_net(train=True), X, mode="train")
    with pytest.raises(OSError, match="disk full"):
        export.save(other, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
