"""The example-network zoo: registry, deterministic builds, shapes and parity with torch.nn."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from normport import models
from normport.models import zoo
from normport.models.zoo._calibrate import NORM_TYPES
from normport.models.zoo.sequence import GatedLinearRecurrence

NAMES = zoo.names()
CONVERTIBLE = [n for n in NAMES if n != "cnn_sn"]
ATOL = 1e-5

# name -> expected output shape for (batch size, dims)
OUTPUT_SHAPES = {
    "cnn_bn": lambda n, d: (n, 10),
    "cnn_gn": lambda n, d: (n, 10),
    "cnn_sn": lambda n, d: (n, 10),
    "style_in": lambda n, d: (n, 3, d["height"], d["width"]),
    "transformer_ln": lambda n, d: (n, d["seq_len"], 64),
    "llm_rms": lambda n, d: (n, d["seq_len"], 64),
    "rnn_ln": lambda n, d: (n, d["seq_len"], 4),
    "seq_bn": lambda n, d: (n, d["seq_len"], 4),
}
# Non-default sizes of the dynamic dimensions (images: multiples of 4 for style_in).
OTHER_DIMS = {"height": 24, "width": 40, "seq_len": 7}


def run(net: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    with torch.no_grad():
        return net(*inputs)


def norm_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in net.named_modules() if isinstance(m, NORM_TYPES)]


# -- registry ---------------------------------------------------------------------------------


def test_names() -> None:
    assert NAMES == [
        "cnn_bn",
        "cnn_gn",
        "cnn_sn",
        "llm_rms",
        "rnn_ln",
        "seq_bn",
        "style_in",
        "transformer_ln",
    ]
    assert set(OUTPUT_SHAPES) == set(NAMES)


def test_get_unknown_name() -> None:
    with pytest.raises(KeyError, match=r"unknown zoo network 'resnet999'.*cnn_bn.*transformer_ln"):
        zoo.get("resnet999")


@pytest.mark.parametrize("name", NAMES)
def test_spec_metadata(name: str) -> None:
    spec = zoo.get(name)
    assert isinstance(spec, zoo.ZooSpec)
    assert spec.name == name
    assert spec.description
    assert set(spec.dynamic_dims) == set(spec.input_names)
    assert spec.output_names
    symbols = set()
    for axes in spec.dynamic_dims.values():
        assert axes[0] == "batch"
        symbols |= set(axes.values())
    assert set(spec.dims) == symbols - {"batch"}
    assert len(spec.example_inputs()) == len(spec.input_names)
    with pytest.raises(TypeError, match="unknown dimension"):
        spec.example_inputs(2, no_such_dim=3)


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_deterministic(name: str) -> None:
    spec = zoo.get(name)
    for a, b in zip(spec.example_inputs(3), spec.example_inputs(3), strict=True):
        assert torch.equal(a, b)
    different = spec.example_inputs(3, seed=1)
    assert not all(
        torch.equal(a, b) for a, b in zip(spec.example_inputs(3), different, strict=True)
    )


# -- build ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_and_seeded(name: str) -> None:
    spec = zoo.get(name)
    rng_before = torch.get_rng_state()
    a, b, c = spec.build(0), spec.build(0), spec.build(1)
    assert torch.equal(torch.get_rng_state(), rng_before), "build touched the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    for path, layer in norm_layers(a):
        other = dict(c.named_modules())[path]
        if layer.weight is not None:
            assert not torch.equal(layer.weight, other.weight), path


@pytest.mark.parametrize("name", NAMES)
def test_build_state(name: str) -> None:
    net = zoo.get(name).build(seed=3)
    assert not any(m.training for m in net.modules()), "not in eval mode"
    layers = norm_layers(net)
    assert layers, "no normport norm layer"
    assert not any(
        isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm | nn.RMSNorm)
        for m in net.modules()
    ), "torch.nn norm layer in a zoo network"
    for path, m in layers:
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if weight is not None:
            assert not torch.allclose(weight, torch.ones_like(weight)), path
        if bias is not None:
            assert not torch.allclose(bias, torch.zeros_like(bias)), path
        if isinstance(m, models.SwitchableNorm1d | models.SwitchableNorm2d):
            for logits in (m.mean_weight, m.var_weight):
                assert (logits - logits[0]).abs().max() > 1e-2, path
        if getattr(m, "running_mean", None) is not None:
            assert (m.running_mean.abs() > 1e-2).any(), path
            assert ((m.running_var - 1).abs() > 1e-2).any(), path
            assert torch.isfinite(m.running_var).all() and (m.running_var > 0).all(), path
            # torch.nn's InstanceNorm never advances num_batches_tracked; the twin must not.
            instance = isinstance(
                m, models.InstanceNorm1d | models.InstanceNorm2d | models.InstanceNorm3d
            )
            assert (int(m.num_batches_tracked) == 0) if instance else (m.num_batches_tracked > 0)


def test_style_in_has_running_stats() -> None:
    net = zoo.get("style_in").build()
    assert any(getattr(m, "running_mean", None) is not None for _, m in norm_layers(net))


# -- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("other_dims", [False, True], ids=["default_dims", "other_dims"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name: str, batch_size: int, other_dims: bool) -> None:
    spec = zoo.get(name)
    dims = {k: OTHER_DIMS[k] for k in spec.dims} if other_dims else {}
    inputs = spec.example_inputs(batch_size, **dims)
    out = run(spec.build(), inputs)
    assert out.shape == OUTPUT_SHAPES[name](batch_size, {**spec.dims, **dims})
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_independent_of_batch_mates(name: str) -> None:
    spec = zoo.get(name)
    net = spec.build()
    inputs = spec.example_inputs(3)
    batched = run(net, inputs)
    alone = run(net, tuple(t[1:2] for t in inputs))
    torch.testing.assert_close(alone, batched[1:2], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llm_rms", "rnn_ln"])
def test_causal(name: str) -> None:
    """Outputs at steps < t do not depend on inputs at steps >= t."""
    spec = zoo.get(name)
    net = spec.build()
    (x,) = spec.example_inputs(2, seq_len=10)
    (y,) = spec.example_inputs(2, seq_len=10, seed=7)
    changed = torch.cat([x[:, :6], y[:, 6:]], dim=1)
    a, b = run(net, (x,)), run(net, (changed,))
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=ATOL, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_gated_recurrence_matches_step_loop() -> None:
    torch.manual_seed(0)
    cell = GatedLinearRecurrence(5, 6)
    x = torch.randn(3, 40, 5) * 3
    with torch.no_grad():
        got = cell(x)
        a = torch.sigmoid(cell.gate(x))
        c = torch.tanh(cell.candidate(x))
        h = torch.zeros(3, 6)
        steps = []
        for t in range(x.shape[1]):
            h = a[:, t] * h + (1 - a[:, t]) * c[:, t]
            steps.append(h)
    torch.testing.assert_close(got, torch.stack(steps, 1), atol=1e-5, rtol=1e-5)


# -- conversion to torch.nn -------------------------------------------------------------------


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_convert_parity_eval(name: str) -> None:
    spec = zoo.get(name)
    net = spec.build(seed=2)
    twin = models.convert(net, to="torch")
    assert not norm_layers(twin), "normport layer left after convert"
    assert not twin.training
    for batch_size in (1, 3):
        inputs = spec.example_inputs(batch_size)
        torch.testing.assert_close(run(twin, inputs), run(net, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_convert_parity_train(name: str) -> None:
    spec = zoo.get(name)
    net = spec.build(seed=2)
    twin = models.convert(net, to="torch")
    net.train()
    twin.train()
    for step in range(2):
        inputs = spec.example_inputs(4, seed=step)
        torch.testing.assert_close(run(twin, inputs), run(net, inputs), atol=ATOL, rtol=0)
    ours, theirs = dict(net.named_buffers()), dict(twin.named_buffers())
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, atol=ATOL, rtol=0, msg=key)


def test_convert_switchable_raises() -> None:
    net = zoo.get("cnn_sn").build()
    with pytest.raises(ValueError, match=r"'features\.0\.1'.*SwitchableNorm2d.*no torch twin"):
        models.convert(net, to="torch")
