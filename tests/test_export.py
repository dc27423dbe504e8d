"""Every layer x configuration x mode x opset: structure, checker, and numbers against PyTorch
(onnxruntime) and against a second runtime (onnx's ReferenceEvaluator); for the default
target, and for ``target="standard"`` where a case's structure differs between the two."""

from __future__ import annotations

import copy
import functools

import numpy as np
import onnx
import pytest
import torch

from normport import export
from normport.runtime.verify._reference import reference
from tests.cases import make_input
from tests.export_cases import CASES, OPSETS, TARGETS, ExportCase
from tests.onnx_helpers import close, default_opset, session, top_level_ops

MODES = ("eval", "train")
CASE_BY_ID = {c.id: c for c in CASES}


@functools.cache
def _exported(
    case_id: str, mode: str, target: str = TARGETS[0]
) -> tuple[torch.nn.Module, dict[int, onnx.ModelProto]]:
    case = CASE_BY_ID[case_id]
    layer = case.build(mode)
    x = make_input(case.shapes[0], torch.Generator().manual_seed(1), torch.float32)
    dynamic = {"input": {axis: f"d{axis}" for axis in case.dynamic_axes}}
    models = export.to_onnx_opsets(
        layer, (x,), mode=mode, opsets=OPSETS, dynamic=dynamic, target=target
    )
    return layer, models


@functools.cache
def _session(case_id: str, mode: str, opset: int, target: str = TARGETS[0]):
    return session(_exported(case_id, mode, target)[1][opset])


def _inputs(case: ExportCase, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [make_input(shape, gen, torch.float32) for shape in case.shapes]


def _state_feeds(layer: torch.nn.Module) -> dict[str, np.ndarray]:
    return {
        name: getattr(layer, attr).numpy().copy()  # torch updates its buffers in place
        for (name, _), attr in zip(
            export.state_names(""),
            ("running_mean", "running_var", "num_batches_tracked"),
            strict=True,
        )
    }


def _updates(layer: torch.nn.Module, mode: str) -> bool:
    return mode == "train" and getattr(layer, "track_running_stats", False)


def _modes(case: ExportCase) -> tuple[str, ...]:
    """A train export needs a layer that updates running statistics (else it raises)."""
    return MODES if _updates(case.build("train"), "train") else ("eval",)


def _targets(case: ExportCase, mode: str) -> tuple[str, ...]:
    """The default target; also ``"standard"`` where the case list gives it other ops."""
    layer = case.build(mode)
    expected = {t: [case.structure(mode, o, layer, t) for o in OPSETS] for t in TARGETS}
    return TARGETS if expected["standard"] != expected[TARGETS[0]] else TARGETS[:1]


PARAMS = [(c, m, o, t) for c in CASES for m in _modes(c) for t in _targets(c, m) for o in OPSETS]
PARAM_IDS = [f"{c.id}-{m}-{o}" + (f"-{t}" if t != TARGETS[0] else "") for c, m, o, t in PARAMS]
NAMES = ("case", "mode", "opset", "target")


@pytest.mark.parametrize(NAMES, PARAMS, ids=PARAM_IDS)
def test_structure(case: ExportCase, mode: str, opset: int, target: str):
    layer, models = _exported(case.id, mode, target)
    model = models[opset]
    assert default_opset(model) == opset
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert top_level_ops(model) == case.structure(mode, opset, layer, target)
    assert {p.key: p.value for p in model.metadata_props}["target"] == target
    called = {op.split(".", 1)[1] for op in top_level_ops(model) if op.startswith("normport.")}
    assert {f.name for f in model.functions} == called
    state = [n for n, _ in export.state_names("")] if _updates(layer, mode) else []
    assert [i.name for i in model.graph.input] == ["input", *state]
    assert [o.name for o in model.graph.output] == ["output"] + [
        o for _, o in export.state_names("")
    ] * bool(state)


@pytest.mark.parametrize(NAMES, PARAMS, ids=PARAM_IDS)
def test_onnxruntime_matches_pytorch(case: ExportCase, mode: str, opset: int, target: str):
    """Two batch sizes and two spatial / sequence sizes through one file; in train mode the
    running statistics are fed back for every step and checked against PyTorch's buffers."""
    layer, _ = _exported(case.id, mode, target)
    torch_layer = copy.deepcopy(layer)
    sess = _session(case.id, mode, opset, target)
    updates = _updates(layer, mode)
    state = _state_feeds(torch_layer) if updates else {}
    for step, x in enumerate(_inputs(case, seed=opset)):
        with torch.no_grad():
            expected = torch_layer(x)
        outputs = sess.run(None, {"input": x.numpy(), **state})
        label = f"{case.id} {mode} opset {opset} {target} step {step} {tuple(x.shape)}"
        close(outputs[0], expected.numpy(), f"{label}: output")
        if updates:
            names = [o for _, o in export.state_names("")]
            state = dict(zip([i for i, _ in export.state_names("")], outputs[1:], strict=True))
            for name, value, attr in zip(
                names,
                outputs[1:],
                ("running_mean", "running_var", "num_batches_tracked"),
                strict=True,
            ):
                close(value, getattr(torch_layer, attr).numpy(), f"{label}: {name}")


@pytest.mark.parametrize(NAMES, PARAMS, ids=PARAM_IDS)
def test_reference_evaluator_matches_onnxruntime(
    case: ExportCase, mode: str, opset: int, target: str
):
    layer, models = _exported(case.id, mode, target)
    x = _inputs(case, seed=7)[0].numpy()
    feeds = {"input": x, **(_state_feeds(layer) if _updates(layer, mode) else {})}
    ours = _session(case.id, mode, opset, target).run(None, feeds)
    reference_out = reference(models[opset]).run(None, feeds)
    assert len(ours) == len(reference_out)
    for i, (a, b) in enumerate(zip(ours, reference_out, strict=True)):
        close(a, np.asarray(b), f"{case.id} {mode} opset {opset} {target}: output {i}")
