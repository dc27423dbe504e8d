"""Every zoo network exported at every tested opset, in both modes, checked like the layers."""

from __future__ import annotations

import copy
import functools

import numpy as np
import onnx
import pytest
import torch

from normport import export
from normport.models import zoo
from normport.models.zoo._calibrate import NORM_TYPES
from tests.export_cases import OPSETS
from tests.onnx_helpers import close, default_opset, session, top_level_ops
from tests.test_export import reference

NORM_OPS = {
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "RMSNormalization",
}
MODES = ("eval", "train")


@functools.cache
def _exported(name: str, mode: str):
    spec = zoo.get(name)
    net = spec.build(seed=0).train(mode == "train")
    models = export.to_onnx_opsets(
        net,
        spec.example_inputs(4),
        mode=mode,
        opsets=OPSETS,
        dynamic=spec.dynamic_dims,
        input_names=spec.input_names,
        output_names=spec.output_names,
    )
    return spec, net, models


def _stateful(net: torch.nn.Module, mode: str) -> dict[str, torch.nn.Module]:
    if mode != "train":
        return {}
    return {
        path: m
        for path, m in net.named_modules()
        if getattr(m, "track_running_stats", False) and hasattr(m, "num_batches_tracked")
    }


def _state(layers: dict[str, torch.nn.Module]) -> dict[str, np.ndarray]:
    feeds = {}
    for path, layer in layers.items():
        for (name, _), attr in zip(
            export.state_names(path),
            ("running_mean", "running_var", "num_batches_tracked"),
            strict=True,
        ):
            feeds[name] = getattr(layer, attr).numpy().copy()
    return feeds


def _batches(spec) -> list[tuple[torch.Tensor, ...]]:
    """Two batch sizes and two sizes of every other dynamic dim, through one file."""
    other = {k: v + 4 for k, v in spec.dims.items()}
    return [
        spec.example_inputs(2, seed=1),
        spec.example_inputs(5, seed=2, **other),
        spec.example_inputs(3, seed=3),
    ]


def _modes(name: str) -> tuple[str, ...]:
    """A train export needs a layer that updates running statistics (else it raises)."""
    return MODES if _stateful(zoo.get(name).build(seed=0), "train") else ("eval",)


PARAMS = [(n, m, o) for n in zoo.names() for m in _modes(n) for o in OPSETS]


@pytest.mark.parametrize(
    ("name", "mode", "opset"), PARAMS, ids=[f"{n}-{m}-{o}" for n, m, o in PARAMS]
)
def test_zoo_network(name: str, mode: str, opset: int):
    spec, net, models = _exported(name, mode)
    model = models[opset]
    assert default_opset(model) == opset
    onnx.checker.check_model(model, full_check=True)
    layers = [m for m in net.modules() if isinstance(m, NORM_TYPES)]
    norm_nodes = [op for op in top_level_ops(model) if op in NORM_OPS or op.startswith("normport.")]
    norm_nodes += ["seq"] * sum(  # SequenceBatchNorm's eval form is a per-channel Mul + Add
        1 for m in layers if type(m).__name__ == "SequenceBatchNorm" and mode == "eval"
    )
    assert len(norm_nodes) == len(layers), (norm_nodes, [type(m).__name__ for m in layers])
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["mode"] == mode and metadata["opset"] == str(opset)

    torch_net = copy.deepcopy(net)
    stateful = _stateful(torch_net, mode)
    state = _state(stateful)
    sess = session(model)
    output_names = [o.name for o in sess.get_outputs()]
    for step, inputs in enumerate(_batches(spec)):
        feeds = {k: v.numpy() for k, v in zip(spec.input_names, inputs, strict=True)}
        outputs = dict(zip(output_names, sess.run(None, {**feeds, **state}), strict=True))
        with torch.no_grad():
            expected = torch_net(*inputs)
        label = f"{name} {mode} opset {opset} step {step}"
        close(outputs[spec.output_names[0]], expected.numpy(), label, atol=1e-4, rtol=1e-4)
        state = {}
        for path, layer in stateful.items():
            for (inp, out), attr in zip(
                export.state_names(path),
                ("running_mean", "running_var", "num_batches_tracked"),
                strict=True,
            ):
                close(
                    outputs[out],
                    getattr(layer, attr).numpy(),
                    f"{label}: {out}",
                    atol=1e-5,
                    rtol=1e-5,
                )
                state[inp] = outputs[out]
    if opset == 23:  # a second runtime, on the default opset
        feeds = {k: v.numpy() for k, v in zip(spec.input_names, _batches(spec)[0], strict=True)}
        ref = reference(model).run(None, {**feeds, **_state(_stateful(net, mode))})
        ours = sess.run(None, {**feeds, **_state(_stateful(net, mode))})
        for a, b in zip(ours, ref, strict=True):
            close(a, np.asarray(b), f"{name} {mode}: ReferenceEvaluator", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["cnn_bn", "transformer_ln"])
def test_one_file_serves_batch_1_to_64(name: str):
    spec, net, models = _exported(name, "eval")
    sess = session(models[23])
    for batch in (1, 64):
        inputs = spec.example_inputs(batch, seed=batch)
        feeds = {k: v.numpy() for k, v in zip(spec.input_names, inputs, strict=True)}
        with torch.no_grad():
            expected = net(*inputs)
        close(
            sess.run(None, feeds)[0],
            expected.numpy(),
            f"{name} batch {batch}",
            atol=1e-4,
            rtol=1e-4,
        )
