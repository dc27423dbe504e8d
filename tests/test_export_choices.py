"""The export targets and their form table (issue 12): the table is whole and consistent with
its own measurements, each target gets what it promises, a bad target is refused.

The per-case structure and numbers of both targets are in :mod:`tests.test_export`; here the
table itself, :func:`choose`, the option's validation and its metadata.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from normport import export, models
from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import lowering_for
from normport.export.lowerings._choices import CHOICES, CLEAR_WIN, MEASURED_ON, Form, choose
from normport.models.randomize import randomize
from tests.onnx_helpers import close, session, top_level_ops
from tests.test_export import reference

# The opset each standard op is defined at (onnx's operator list), written here, not read from
# the lowerings: a row may give the op only from there on.
DEFINED_AT = {"layernorm": 17, "rmsnorm": 23, "groupnorm": 21}
OPSETS = range(export.MIN_OPSET, export.MAX_OPSET + 1)
KEYS = sorted({(row.kind, row.statistics) for row in CHOICES})


@pytest.mark.parametrize(("kind", "stats"), KEYS, ids=[f"{k}-{s}" for k, s in KEYS])
def test_each_kind_has_exactly_one_row_per_opset(kind: str, stats: str):
    covered = [
        o for row in CHOICES if (row.kind, row.statistics) == (kind, stats) for o in row.opsets
    ]
    assert sorted(covered) == list(OPSETS)


@pytest.mark.parametrize("row", CHOICES, ids=lambda r: f"{r.kind}-{r.statistics}-{r.opsets.start}")
def test_rows_follow_their_measurements(row):
    """The onnxruntime column leaves the standard column only for a measured clear win, and
    keeps it wherever nothing measured clearly faster."""
    measured = dict(row.measured)
    assert row.standard not in measured
    if row.onnxruntime != row.standard:
        assert measured[row.onnxruntime] <= CLEAR_WIN
    else:
        assert all(ratio > CLEAR_WIN for ratio in measured.values()), measured
    if not measured:  # one exact form: the function where the opset has no standard op
        assert row.standard == row.onnxruntime == Form.FUNCTION
        assert row.opsets.stop <= DEFINED_AT[row.kind]
    assert row.why


@pytest.mark.parametrize("row", CHOICES, ids=lambda r: f"{r.kind}-{r.statistics}-{r.opsets.start}")
def test_standard_target_is_the_standard_op_wherever_the_opset_has_one(row):
    since = DEFINED_AT.get(row.kind, export.MIN_OPSET)
    if row.kind == "sequence_batchnorm":  # channel-last: no standard op without transposes
        assert row.standard == Form.FOLDED
    elif row.opsets.start >= since:
        assert row.standard == Form.OP
    else:
        assert row.opsets.stop <= since and row.standard == Form.FUNCTION


def test_the_table_names_the_runtime_it_was_measured_on():
    assert MEASURED_ON.startswith("onnxruntime ")


def _spec(kind: str, **fields) -> LayerSpec:
    return LayerSpec(kind=kind, path="l", cls="X", rank=4, channels=6, eps=1e-5, **fields)


def test_choose_reads_the_table_per_target_and_opset():
    spec = _spec("groupnorm", num_groups=2)
    forms = {
        (target, opset): choose(Emitter(opset, 1, set(), target=target), spec, tuple(Form))
        for target in export.TARGETS
        for opset in (20, 21, 28)
    }
    assert forms == {
        ("onnxruntime", 20): Form.FUNCTION,
        ("onnxruntime", 21): Form.FUNCTION,
        ("onnxruntime", 28): Form.FUNCTION,
        ("standard", 20): Form.FUNCTION,
        ("standard", 21): Form.OP,
        ("standard", 28): Form.OP,
    }


def test_choose_refuses_a_form_the_lowering_does_not_emit_and_a_missing_row():
    em = Emitter(23, 1, set(), target="standard")
    with pytest.raises(RuntimeError, match=r"gives groupnorm .* the form 'op', which its lowering"):
        choose(em, _spec("groupnorm", num_groups=2), (Form.FUNCTION,))
    with pytest.raises(LookupError, match=r"no row for switchable with running statistics"):
        choose(em, _spec("switchable", batch_stats=False), tuple(Form))
    assert Emitter(23, 1, set()).target == export.DEFAULT_TARGET == "onnxruntime"


def test_an_emitter_without_a_target_lowers_for_the_default():
    """export._train_rewrite builds its Emitter without a target: the default's forms."""
    em = Emitter(23, onnx.TensorProto.FLOAT, taken=set())
    spec = _spec("groupnorm", num_groups=2)
    lowering_for(spec).lower(em, spec, Inputs("x", "w", "b"), ["y"])
    assert [(n.domain, n.op_type) for n in em.nodes] == [("normport", "GroupNorm")]


BAD_TARGETS = ["tensorrt", "Standard", "", None, 1]


@pytest.mark.parametrize("target", BAD_TARGETS, ids=repr)
def test_a_bad_target_is_refused_naming_it_and_the_choices(target):
    layer = models.LayerNorm(4).eval()
    message = rf"unknown export target {repr(target)!s}: expected one of 'onnxruntime', 'standard'"
    message = message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=message):
        export.to_onnx(layer, torch.randn(2, 4), mode="eval", target=target)
    with pytest.raises(ValueError, match=message):
        export.to_onnx_opsets(layer, torch.randn(2, 4), mode="eval", opsets=(17,), target=target)
    with pytest.raises(ValueError, match=message):
        Emitter(17, 1, set(), target=target)


class _Mixed(nn.Module):
    """One layer per table kind whose forms differ or tie: GroupNorm, LayerNorm, RMSNorm,
    BatchNorm2d, InstanceNorm2d."""

    def __init__(self):
        super().__init__()
        self.gn = models.GroupNorm(2, 6)
        self.bn = models.BatchNorm2d(6)
        self.inorm = models.InstanceNorm2d(6, affine=True)
        self.ln = models.LayerNorm(5)
        self.rms = models.RMSNorm(5)

    def forward(self, x):
        return self.rms(self.ln(self.inorm(self.bn(self.gn(x)))))


@pytest.mark.parametrize("opset", [21, 23, 28])
def test_both_targets_match_pytorch_and_differ_only_in_groupnorm(opset):
    net = _Mixed()
    for i, layer in enumerate(net.children()):
        randomize(layer, torch.Generator().manual_seed(10 + i))
    net.eval()
    x = 1.5 * torch.randn(3, 6, 4, 5) + 0.5
    files = {t: export.to_onnx(net, x, mode="eval", opset=opset, target=t) for t in export.TARGETS}
    norms = {
        "normport.GroupNorm",
        "GroupNormalization",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "RMSNormalization",
        "normport.RMSNorm",
    }
    rms = "RMSNormalization" if opset >= 23 else "normport.RMSNorm"
    tail = ["BatchNormalization", "InstanceNormalization", "LayerNormalization", rms]
    assert [op for op in top_level_ops(files["onnxruntime"]) if op in norms] == [
        "normport.GroupNorm",
        *tail,
    ]
    assert [op for op in top_level_ops(files["standard"]) if op in norms] == [
        "GroupNormalization",
        *tail,
    ]
    with torch.no_grad():
        want = net(x).numpy()
    for target, model in files.items():
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["target"] == target
        nodes = [e["node"] for e in json.loads(meta["normalization_layers"])]
        assert (
            nodes[0]
            == {"onnxruntime": "normport.GroupNorm", "standard": "GroupNormalization"}[target]
        )
        got = session(model).run(None, {"x": x.numpy()})[0]
        close(got, want, f"{target} opset {opset}: onnxruntime vs PyTorch")
        ref = np.asarray(reference(model).run(None, {"x": x.numpy()})[0])
        close(ref, want, f"{target} opset {opset}: ReferenceEvaluator vs PyTorch")


@pytest.mark.parametrize("opset", [13, 14, 20])
def test_groupnorm_function_applies_its_affine_in_one_pass(opset):
    """One BatchNormalization (mean 0, variance 1, epsilon 0) instead of Mul + Add, at opset 13
    too: BatchNormalization-9 there, which onnx 1.23's ReferenceEvaluator runs inside a
    function only with runtime.verify's fix (else in training mode)."""
    affine = ["BatchNormalization"]
    layer = randomize(models.GroupNorm(2, 6), torch.Generator().manual_seed(3)).eval()
    x = torch.randn(2, 6, 4, 3)
    model = export.to_onnx(layer, x, mode="eval", opset=opset)
    (function,) = model.functions
    ops = [n.op_type for n in function.node if n.op_type not in ("Constant", "Shape", "Cast")]
    assert ops[-len(affine) :] == affine and "InstanceNormalization" in ops
    assert not {"Mul", "Add"} & set(ops)
    with torch.no_grad():
        want = layer(x).numpy()
    feeds = {"input": x.numpy()}
    close(session(model).run(None, feeds)[0], want, f"opset {opset}: onnxruntime")
    close(np.asarray(reference(model).run(None, feeds)[0]), want, f"opset {opset}: reference")
