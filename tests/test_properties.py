"""Property tests over shapes (hypothesis): normport equals torch.nn for any valid shape."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normport import models
from normport.models.convert import TorchSequenceBatchNorm
from normport.models.randomize import randomize

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
dims = st.integers(min_value=1, max_value=5)


def _compare(ours: nn.Module, twin: nn.Module, x: torch.Tensor, seed: int, train: bool) -> None:
    randomize(ours, torch.Generator().manual_seed(seed))
    twin.load_state_dict(ours.state_dict())
    ours.train(train)
    twin.train(train)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), twin(xb)
    torch.testing.assert_close(ya, yb, atol=1e-9, rtol=1e-7)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-8, rtol=1e-6)
    for (name, a), (_, b) in zip(ours.named_buffers(), twin.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)


def _x(shape, seed):
    return 2 + 3 * torch.randn(
        shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@SETTINGS
@given(
    n=st.integers(2, 5),
    c=dims,
    spatial=st.lists(dims, min_size=0, max_size=3),
    seed=st.integers(0, 99),
    train=st.booleans(),
    momentum=st.sampled_from([0.1, None, 0.0, 1.0]),
)
def test_batchnorm_any_shape(n, c, spatial, seed, train, momentum):
    rank = 2 + len(spatial)
    ours, twin = {
        2: (models.BatchNorm1d, nn.BatchNorm1d),
        3: (models.BatchNorm1d, nn.BatchNorm1d),
        4: (models.BatchNorm2d, nn.BatchNorm2d),
        5: (models.BatchNorm3d, nn.BatchNorm3d),
    }[rank]
    kw = {"momentum": momentum, "dtype": torch.float64}
    _compare(ours(c, **kw), twin(c, **kw), _x((n, c, *spatial), seed), seed, train)


@SETTINGS
@given(
    n=st.integers(1, 4), seq=st.integers(1, 6), c=dims, seed=st.integers(0, 99), train=st.booleans()
)
def test_sequence_batchnorm_any_shape(n, seq, c, seed, train):
    if n * seq == 1:
        seq = 2
    kw = {"dtype": torch.float64}
    _compare(
        models.SequenceBatchNorm(c, **kw),
        TorchSequenceBatchNorm(c, **kw),
        _x((n, seq, c), seed),
        seed,
        train,
    )


@SETTINGS
@given(
    n=st.integers(1, 4),
    c=dims,
    spatial=st.lists(st.integers(2, 5), min_size=1, max_size=3),
    seed=st.integers(0, 99),
    train=st.booleans(),
    track=st.booleans(),
    batched=st.booleans(),
)
def test_instancenorm_any_shape(n, c, spatial, seed, train, track, batched):
    cls = {
        1: (models.InstanceNorm1d, nn.InstanceNorm1d),
        2: (models.InstanceNorm2d, nn.InstanceNorm2d),
        3: (models.InstanceNorm3d, nn.InstanceNorm3d),
    }[len(spatial)]
    kw = {"affine": True, "track_running_stats": track, "dtype": torch.float64}
    shape = (n, c, *spatial) if batched else (c, *spatial)
    _compare(cls[0](c, **kw), cls[1](c, **kw), _x(shape, seed), seed, train)


@SETTINGS
@given(
    n=st.integers(1, 4),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 3),
    spatial=st.lists(dims, min_size=0, max_size=2),
    seed=st.integers(0, 99),
)
def test_groupnorm_any_shape(n, groups, per_group, spatial, seed):
    c = groups * per_group
    if per_group * max(1, torch.Size(spatial).numel()) == 1:
        spatial = [2]
    kw = {"dtype": torch.float64}
    _compare(
        models.GroupNorm(groups, c, **kw),
        nn.GroupNorm(groups, c, **kw),
        _x((n, c, *spatial), seed),
        seed,
        True,
    )


@SETTINGS
@given(
    lead=st.lists(dims, min_size=0, max_size=3),
    norm=st.lists(dims, min_size=1, max_size=3),
    seed=st.integers(0, 99),
    rms=st.booleans(),
    affine=st.booleans(),
)
def test_trailing_norms_any_shape(lead, norm, seed, rms, affine):
    kw = {"elementwise_affine": affine, "dtype": torch.float64}
    if rms:
        ours, twin = models.RMSNorm(norm, **kw), nn.RMSNorm(norm, **kw)
    else:
        ours, twin = models.LayerNorm(norm, **kw), nn.LayerNorm(norm, **kw)
    _compare(ours, twin, _x((*lead, *norm), seed), seed, True)
