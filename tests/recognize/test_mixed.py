"""Hand-written norms beside torch.nn layers in one network: every norm is one node, and the
count per op is what the network holds."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from tests.onnx_helpers import top_level_ops
from tests.recognize.harness import check_numbers, export_opsets, layers, randomize
from tests.recognize.test_eps_outside import StdPlusEps
from tests.recognize.test_frozen import FrozenBN
from tests.recognize.test_rmsnorm import LlamaStyle
from tests.recognize.test_running import RunningNorm
from tests.recognize.test_standardize import Standardize

PRIMITIVES = {"ReduceMean", "Sqrt", "Pow", "Div", "Reciprocal", "Sub"}


def _count(model) -> Counter:
    return Counter(op for op in top_level_ops(model) if op not in ("Gemm", "MatMul", "Add", "Relu"))


def test_token_block():
    net = randomize(
        nn.Sequential(
            nn.Linear(12, 12),
            LlamaStyle(12),
            nn.LayerNorm(12),
            Standardize("var_correction_0", (-1,), (12,)),
            nn.ReLU(),
            StdPlusEps("std", -1, (12,)),
            nn.RMSNorm(12, eps=1e-6),
            nn.Linear(12, 4),
        )
    )
    models = export_opsets(net, (2, 5, 12))
    for opset, model in models.items():
        ln = "LayerNormalization" if opset >= 17 else "normport.LayerNorm"
        rms = "RMSNormalization" if opset >= 23 else "normport.RMSNorm"
        counts = _count(model)
        assert counts[ln] == 2 and counts[rms] == 2, (opset, counts)
        assert counts["normport.NormalizeStdPlusEps"] == 1, (opset, counts)
        assert not PRIMITIVES & set(counts), (opset, counts)
        sources = Counter((e["kind"], e["source"]) for e in layers(model))
        assert sources == {
            ("rmsnorm", "handwritten"): 1,
            ("rmsnorm", "module"): 1,
            ("layernorm", "module"): 1,
            ("layernorm", "handwritten"): 2,
        }
    check_numbers(net, models, (2, 5, 12))


def test_image_block():
    net = randomize(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            FrozenBN(6),
            nn.ReLU(),
            nn.Conv2d(6, 6, 1),
            nn.BatchNorm2d(6),
            RunningNorm(6, "view_sqrt"),
            Standardize("var_mean", (0, 2, 3), (1, 6, 1, 1)),
        )
    )
    models = export_opsets(net, (2, 3, 5, 4))
    for opset, model in models.items():
        assert top_level_ops(model) == [
            "Conv",
            "BatchNormalization",
            "Relu",
            "Conv",
            "BatchNormalization",
            "BatchNormalization",
            "normport.BatchNormBatchStats",
        ], opset
        assert [e["source"] for e in layers(model)] == [
            "handwritten",
            "module",
            "handwritten",
            "handwritten",
        ]
    check_numbers(net, models, (2, 3, 5, 4))


def test_every_float_dtype_keeps_one_node():
    """A bfloat16 copy of the token block: the up-casts inside LlamaStyle are absorbed."""
    net = randomize(nn.Sequential(nn.Linear(12, 12), LlamaStyle(12), nn.LayerNorm(12)))
    models = export_opsets(net.to(torch.bfloat16), (2, 5, 12), dtype=torch.bfloat16)
    assert _count(models[23]) == {"RMSNormalization": 1, "LayerNormalization": 1}
