"""The shared case list (``benchmarks.cases``), the twins built from it, and the shared options."""

from __future__ import annotations

import pytest
import torch

from benchmarks import options
from benchmarks.cases import LAYERS, SERVED, layer_cases, pick, served_cases
from benchmarks.twins import (
    ReferenceSwitchableNorm2d,
    make_input,
    make_layer,
    make_twin,
    torch_twin,
    twin_class,
    twin_name,
)
from normport import models
from normport.models import zoo


def test_layer_names_are_unique_and_opsets_ascending() -> None:
    assert len({case.layer for case in LAYERS}) == len(LAYERS)
    for case in LAYERS:
        assert list(case.opsets) == sorted(set(case.opsets)), case.layer


@pytest.mark.parametrize("case", LAYERS, ids=lambda case: case.layer)
def test_case_builds_its_layer_and_a_twin_that_agrees(case) -> None:
    gen = torch.Generator().manual_seed(0)
    ours = make_layer(case, gen).eval()
    assert type(ours) is getattr(models, case.layer)
    twin = make_twin(twin_class(case), case, ours)  # strict state_dict load
    assert not twin.training
    x = make_input(case.shape, gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), twin(x), rtol=1e-4, atol=1e-4)


def test_twins_come_from_the_layer_table_or_the_references() -> None:
    (switchable,) = layer_cases(["SwitchableNorm2d"])
    assert torch_twin(switchable) is None
    assert twin_class(switchable) is ReferenceSwitchableNorm2d
    assert twin_name(switchable) == "benchmarks.twins.ReferenceSwitchableNorm2d(256)"
    (instance,) = layer_cases(["InstanceNorm2d"])
    assert torch_twin(instance) is twin_class(instance) is torch.nn.InstanceNorm2d
    assert twin_name(instance) == "torch.nn.InstanceNorm2d(256, affine=True)"


@pytest.mark.parametrize("case", SERVED, ids=lambda case: case.network)
def test_served_sample_shape_is_the_zoo_default(case) -> None:
    (x,) = zoo.get(case.network).example_inputs(1)
    assert x.dtype in (torch.float32, torch.int64)  # images and sequences; token ids
    assert tuple(x.shape[1:]) == case.sample_shape


def test_pick_is_case_insensitive_in_list_order_and_names_the_choices() -> None:
    assert pick(["A", "Bb", "c"], None, "thing") == ["A", "Bb", "c"]
    assert pick(["A", "Bb", "c"], ["C", " bb"], "thing") == ["Bb", "c"]
    with pytest.raises(SystemExit, match=r"unknown thing\(s\) \['nope'\]; choose from"):
        pick(["A"], ["nope"], "thing")
    assert [case.network for case in served_cases(["CNN_BN"])] == ["cnn_bn"]
    with pytest.raises(SystemExit, match=r"unknown layer\(s\) \['nosuchnorm'\]"):
        layer_cases(["NoSuchNorm"])


def test_shared_options() -> None:
    parser = options.layer_parser("prog", "what it does", "out.json")
    args = options.parse(parser, ["--layers", "LayerNorm,GroupNorm", "RMSNorm"])
    assert args.layers == ["LayerNorm", "GroupNorm", "RMSNorm"]
    assert (args.threads, str(args.out), args.quick) == (1, "out.json", False)
    assert options.parse(parser, []).layers is None
    with pytest.raises(SystemExit):
        options.parse(parser, ["--threads", "0"])
