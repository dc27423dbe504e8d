"""``export.batch_mates.measure``: does a sample's eval output depend on its batch-mates?

Ground truth comes from how each model is built (batch statistics, a reduction over axis 0,
attention over axis 0 vs per-sample statistics), and where a number is checked it is
recomputed here in numpy from the formula, not from the code under test.  Weights, affine
parameters and running statistics are random, never 1 / 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from normport.export.batch_mates import DEFAULT_THRESHOLD, BatchMates, measure, reason
from normport.models import zoo


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics (variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            values = torch.rand(t.shape, generator=generator, dtype=t.dtype)
            t.copy_(0.5 + values * 1.5 if "var" in name or "weight" in name else values - 0.5)
    return module


def _x(*shape: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 + 1


def _r(together: np.ndarray, alone: list[np.ndarray]) -> float:
    """The documented measure, from plain numpy arrays."""
    return max(
        float(np.abs(together[i] - a).max() / max(np.abs(a).max(), np.finfo(np.float64).tiny))
        for i, a in enumerate(alone)
    )


# -- ground truth: dependent --------------------------------------------------------------------


def test_batchnorm_without_running_stats_is_dependent_by_the_formula() -> None:
    bn = _randomize(nn.BatchNorm2d(3, track_running_stats=False)).double().eval()
    x = _x(5, 3, 4, 6)
    g, b, eps = bn.weight.detach().numpy(), bn.bias.detach().numpy(), bn.eps
    xs = x.numpy()

    def normalize(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        mean = v.mean(axes, keepdims=True)
        var = v.var(axes, keepdims=True)  # biased, as the output uses
        return (v - mean) / np.sqrt(var + eps) * g[:, None, None] + b[:, None, None]

    together = normalize(xs, (0, 2, 3))
    alone = [normalize(xs[i : i + 1], (0, 2, 3))[0] for i in range(5)]
    mates = measure(bn, x)
    assert mates.dependent == ("output",) and not mates.independent
    assert mates.outputs["output"] == pytest.approx(_r(together, alone), rel=1e-9)
    assert mates.outputs["output"] > 0.01


def test_explicit_mixing_matches_the_formula() -> None:
    class Mix(nn.Module):
        def forward(self, x):
            return x + 0.5 * x.mean(0)

    x = _x(4, 7)
    xs = x.numpy()
    together = xs + 0.5 * xs.mean(0)
    alone = [1.5 * xs[i] for i in range(4)]  # a sample alone is its own mean
    mates = measure(Mix().eval(), (x,))
    assert mates.dependent == ("output",)
    assert mates.outputs["output"] == pytest.approx(_r(together, alone), rel=1e-12)


def test_attention_across_axis_0_is_dependent() -> None:
    """batch_first=False: axis 0 is the sequence, so 'samples' attend to each other."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=False).double().eval()

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    mates = measure(SelfAttention().eval(), _x(5, 3, 8))
    assert mates.dependent == ("output",) and mates.outputs["output"] > 0.01


def test_a_model_that_cannot_run_one_sample_alone_is_dependent() -> None:
    """BatchNorm1d on (N, C): one value per channel at batch 1, which torch refuses."""
    bn = _randomize(nn.BatchNorm1d(4, track_running_stats=False)).eval()
    mates = measure(bn, _x(8, 4, dtype=torch.float32))
    assert mates.dependent == ("output",) and math.isinf(mates.outputs["output"])
    assert "cannot be computed for one sample alone" in reason(mates)


# -- ground truth: independent ------------------------------------------------------------------


def test_batchnorm_with_running_stats_is_independent() -> None:
    bn = _randomize(nn.BatchNorm2d(3)).eval()
    assert bn.running_mean.abs().max() > 0.05 and (bn.running_var - 1).abs().max() > 0.05
    mates = measure(bn, _x(6, 3, 5, 5, dtype=torch.float32))
    assert mates.independent and mates.dependent == () and mates.unbatched == ()
    assert mates.outputs["output"] < 1e-6
    assert reason(mates) is None


def test_transformer_block_with_attention_within_samples_is_independent() -> None:
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    _randomize(block.norm1, 1), _randomize(block.norm2, 2)
    tokens = _x(6, 9, 16, dtype=torch.float32)
    mates = measure(block.eval(), (tokens,))
    assert mates.independent and mates.outputs["output"] < 1e-5


def test_layernorm_and_groupnorm_are_independent() -> None:
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6), nn.Flatten(), nn.LayerNorm(6 * 16))
    _randomize(net[1], 1), _randomize(net[3], 2)
    mates = measure(net.eval(), _x(4, 3, 6, 6, dtype=torch.float32))
    assert mates.independent and mates.outputs["output"] < 1e-5


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_networks_in_eval_are_independent(name: str) -> None:
    """None of the zoo networks uses batch statistics in eval (cnn_sn's batch branch and
    seq_bn use running statistics): all get dynamic batching."""
    spec = zoo.get(name)
    mates = measure(spec.build(seed=0), spec.example_inputs(4))
    assert mates.independent, mates


# -- near misses: float noise, thresholds --------------------------------------------------------


def test_kernel_rounding_between_batch_sizes_does_not_count() -> None:
    """A Linear at batch 8 and at batch 1 may use other GEMM blockings: a few ulps apart."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64)).eval()
    mates = measure(net, _x(8, 256, dtype=torch.float32))
    assert mates.independent
    assert mates.outputs["output"] < DEFAULT_THRESHOLD / 100


def test_the_threshold_separates_a_tiny_mix() -> None:
    class TinyMix(nn.Module):
        def forward(self, x):
            return x + 1e-6 * x.sum(0)

    x = _x(4, 5)
    xs = x.numpy()
    expected = _r(xs + 1e-6 * xs.sum(0), [xs[i] * (1 + 1e-6) for i in range(4)])
    assert 1e-7 < expected < DEFAULT_THRESHOLD
    assert measure(TinyMix().eval(), x).independent
    strict = measure(TinyMix().eval(), x, threshold=expected / 2)
    assert strict.dependent == ("output",) and strict.threshold == expected / 2
    assert strict.outputs["output"] == pytest.approx(expected, rel=1e-9)


# -- outputs without a batch axis ----------------------------------------------------------------


def test_outputs_without_a_batch_axis_are_unbatched() -> None:
    class Several(nn.Module):
        def forward(self, x):
            return {
                "y": x * 3 - 1,
                "total": x.sum(),  # rank 0
                "per_channel": x.mean((0, 2)),  # (C,), C != B
                "per_feature": x.mean((0, 1)),  # (L,), L == B by coincidence
            }

    mates = measure(Several().eval(), _x(4, 3, 4))
    assert mates.outputs == {"y": 0.0}
    assert set(mates.unbatched) == {"total", "per_channel", "per_feature"}
    assert mates.dependent == () and not mates.independent
    assert "without a per-sample batch axis" in reason(mates)


def test_reason_names_outputs_and_sizes() -> None:
    mates = BatchMates({"logits": 0.25, "aux": 1e-9}, ("logits",), 1e-4)
    text = reason(mates)
    assert "output 'logits' changes by up to 0.25" in text and "'aux'" not in text
    assert "threshold 0.0001" in text and "\n" not in text


# -- rejections ----------------------------------------------------------------------------------


def test_training_mode_is_refused_naming_the_submodule() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
    net[1].train()
    with pytest.raises(ValueError, match=r"eval mode .*in training: 1$"):
        measure(net, _x(4, 3, dtype=torch.float32))


class TwoInputs(nn.Module):
    def forward(self, image, mask):
        return image * mask


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ((_x(1, 3), _x(1, 3)), r"input 'image' must have a batch of at least 2 .*\(1, 3\)"),
        ((_x(4, 3), torch.tensor(1.0)), r"input 'mask' must have a batch of at least 2 .*\(\)"),
        ((_x(4, 3), _x(3, 3)), r"the same batch size on axis 0, got input 'image' \(4, 3\)"),
        ((), r"at least one input"),
    ],
)
def test_bad_batches_are_refused_naming_the_input(batch: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        measure(TwoInputs().eval(), batch)


@pytest.mark.parametrize("threshold", [0, -1e-3, math.inf, math.nan])
def test_bad_thresholds_are_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
        measure(TwoInputs().eval(), (_x(2, 3), _x(2, 3)), threshold=threshold)
