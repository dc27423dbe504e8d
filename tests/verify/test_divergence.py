"""The divergence study reads correctly: batch statistics depend on the batch, per-sample
statistics do not; running statistics converge; the reading follows the numbers."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from normport.runtime.verify import divergence, parity, subjects
from normport.runtime.verify.divergence import BatchPoint, Divergence
from normport.runtime.verify.reading import reading
from normport.runtime.verify.tolerances import Tolerance

BATCH_DEPENDENT = ("BatchNorm2d-momentum", "SequenceBatchNorm", "SwitchableNorm2d-momentum")
PER_SAMPLE = (
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "InstanceNorm2d-untracked",
    "InstanceNorm2d-tracked",
)


@functools.cache
def _study(name: str) -> Divergence:
    return divergence.study(subjects.get(name), with_steps=True)


@pytest.mark.parametrize("name", BATCH_DEPENDENT)
def test_batch_statistics_depend_on_batch_mates_and_shrink_with_the_batch(name):
    found = _study(name)
    assert found.depends_on_batch
    assert found.mates_train > 1e-3 * found.output_scale
    assert found.mates_eval == 0.0  # running statistics: eval is per sample
    curve = [p.mean_abs for p in found.batch_curve]
    assert [p.batch_size for p in found.batch_curve] == list(divergence.BATCH_SIZES)
    assert curve[-1] < curve[0] / 4
    assert all(b <= 1.5 * a for a, b in itertools.pairwise(curve))  # noisy, falling


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_statistics_ignore_batch_mates(name):
    found = _study(name)
    assert not found.depends_on_batch
    assert found.mates_train <= 1e-12 and found.mates_eval <= 1e-12


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm2d-untracked"])
def test_train_equals_eval_at_every_batch_size_without_running_statistics(name):
    assert all(p.mean_abs == 0.0 for p in _study(name).batch_curve)


def test_tracked_instance_norm_never_agrees_with_its_eval_mode():
    """Eval uses the average of per-instance statistics: no batch size closes the gap."""
    curve = [p.mean_abs for p in _study("InstanceNorm2d-tracked").batch_curve]
    assert min(curve) > 0.05 and curve[-1] > curve[0] / 2


def test_running_statistics_converge_with_momentum_and_cumulative_average():
    curves = {c.momentum: c for c in _study("BatchNorm2d-momentum").steps}
    assert set(curves) == {0.1, None}
    for curve in curves.values():
        assert curve.steps == list(divergence.STEPS)
        assert curve.mean_error[-1] < curve.mean_error[0] / 10
        assert curve.var_error[-1] < curve.var_error[0] / 10
        assert curve.output_gap[-1] < curve.output_gap[0] / 10
    cumulative = curves[None].mean_error
    assert cumulative[-1] < cumulative[-3]  # the cumulative average keeps improving


def test_instance_norm_with_momentum_none_never_moves():
    frozen = next(c for c in _study("InstanceNorm2d-tracked").steps if c.momentum is None)
    assert len(set(frozen.mean_error)) == 1 and len(set(frozen.var_error)) == 1


def test_networks_batch_mates():
    cnn_bn = divergence.study(subjects.get("cnn_bn"), with_steps=True)
    rnn_ln = divergence.study(subjects.get("rnn_ln"), with_steps=True)
    assert cnn_bn.depends_on_batch and not cnn_bn.steps
    assert not rnn_ln.depends_on_batch
    assert cnn_bn.batch_curve[-1].mean_abs < cnn_bn.batch_curve[0].mean_abs


def _fake(name: str, mates: float) -> Divergence:
    points = [BatchPoint(1, mates, mates), BatchPoint(256, mates / 10, mates / 10)]
    return Divergence(name, "layer", name, 1.0, points, mates, 0.0)


def test_reading_follows_the_numbers():
    text = reading([], [_fake("LayerNorm", 0.0), _fake("BatchNorm2d", 0.5)])["layers"]
    dependent = next(s for s in text if "changes when its 7 batch-mates" in s)
    assert "BatchNorm2d by 0.5" in dependent and "LayerNorm" not in dependent
    # The same layer with measured batch dependence moves to the other list.
    text = reading([], [_fake("LayerNorm", 0.25)])["layers"]
    assert any("LayerNorm by 0.25" in s for s in text)
    assert any("LayerNorm: mean |train - eval| is 0.25 at batch 1" in s for s in text)


@pytest.mark.parametrize(
    ("actual", "expected", "ok", "max_abs"),
    [
        (np.array([1.0, 2.0]), np.array([1.0, 2.00001]), True, 1e-5),
        (np.array([1.0, 2.0]), np.array([1.0, 2.1]), False, 0.1),
        (np.array([1.0, np.nan]), np.array([1.0, 2.0]), False, float("inf")),
        (np.array([1.0]), np.array([1.0, 2.0]), False, float("inf")),
        (np.array(3, np.int64), np.array(3, np.int64), True, 0.0),
        (np.array(4, np.int64), np.array(3, np.int64), False, 1.0),
    ],
    ids=["close", "far", "nan", "shape", "int_equal", "int_off_by_one"],
)
def test_compare(actual, expected, ok, max_abs):
    check = parity.compare(actual, expected, Tolerance(1e-5, 1e-5), "output", 0)
    assert check.ok is ok
    assert check.max_abs == pytest.approx(max_abs, rel=1e-3)


class _PerSampleWithDropout(torch.nn.Module):
    """Per-sample statistics (LayerNorm) and dropout, returning a ``ModelOutput``-like dict."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(6)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> dict:
        return {"hidden": self.drop(self.norm(x)), "pooled": x.mean(-1)}


def make_per_sample_with_dropout():
    torch.manual_seed(8)
    net = _PerSampleWithDropout()
    with torch.no_grad():
        net.norm.weight.copy_(1 + 0.5 * torch.randn(6))
        net.norm.bias.copy_(torch.randn(6))
    return net, torch.randn(4, 5, 6)


def test_structured_outputs_and_dropout_do_not_fake_batch_dependence():
    """A dict output is followed by its first field, and train mode runs with dropout off: a
    per-sample model's sample 0 then does not move with its batch-mates (exactly 0), nor does
    its train output differ from eval.  With dropout on, both would be far from 0."""
    subject = subjects.from_factory(f"{__name__}:make_per_sample_with_dropout")
    found = divergence.study(subject, with_steps=False)
    assert found.mates_train == 0.0 and found.mates_eval == 0.0
    assert all(p.mean_abs == 0.0 for p in found.batch_curve)
    module, x = make_per_sample_with_dropout()
    expected = module.eval()(x)["hidden"]  # the first field, computed by PyTorch itself
    assert found.output_scale > 0 and not found.depends_on_batch
    assert torch.isfinite(expected).all()


class _FunctionalDropout(torch.nn.Module):
    """Dropout written as ``F.dropout(..., self.training)``, as transformers' attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.norm(x), 0.5, self.training)


def make_functional_dropout():
    torch.manual_seed(9)
    return _FunctionalDropout(), torch.randn(4, 5, 6)


def test_a_train_mode_that_stays_random_is_not_measured_rather_than_measured_as_noise():
    subject = subjects.from_factory(f"{__name__}:make_functional_dropout")
    with pytest.raises(divergence.NotMeasured, match=r"random numbers outside nn\.Dropout"):
        divergence.study(subject, with_steps=False)
