"""What the layer benchmark compares: the layers, their twins, their state and inputs, one step.

* :func:`build_cases`: every normport layer at a realistic shape with its torch.nn twin
  (:class:`ReferenceSwitchableNorm2d` for SwitchableNorm2d, which has none);
* :func:`make_pair` / :func:`make_inputs`: both sides with the same random, non-trivial state
  (:func:`randomize_`) and the same input and output gradient;
* :func:`make_step`: the timed step of a mode (eval forward, or train forward + backward);
* :func:`check_agreement`: outputs and gradients compared before timing (:data:`MAX_ABS_DIFF`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.timing import Step
from normport import models
from normport.models.convert import TorchSequenceBatchNorm

__all__ = [
    "MAX_ABS_DIFF",
    "MODES",
    "SEED",
    "Agreement",
    "Case",
    "ReferenceSwitchableNorm2d",
    "build_cases",
    "check_agreement",
    "make_inputs",
    "make_pair",
    "make_step",
    "max_diff",
    "outputs_of",
    "randomize_",
    "select_cases",
]

MAX_ABS_DIFF = 1e-3
"""normport and its twin must agree to below this (outputs and input gradients)."""

MODES = ("eval", "train")
SEED = 0


class ReferenceSwitchableNorm2d(nn.Module):
    """Switchable normalization written the way a user would without normport.

    Mirrors the structure of the authors' reference implementation (Luo et al., 2018):
    instance statistics with one ``var_mean`` call, layer and batch statistics derived from
    them through ``E[x^2] - E[x]^2`` on the (small) statistics, a softmax mix, then
    ``(x - mean) / sqrt(var + eps) * weight + bias``.  Variances are biased, as in normport.
    Parameter and buffer names equal normport's, so one state_dict loads into both.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``(N, C, H, W)`` with the softmax mix of instance, layer and batch stats."""
        n, c = x.shape[0], x.shape[1]
        x3 = x.reshape(n, c, -1)
        var_in, mean_in = torch.var_mean(x3, -1, correction=0, keepdim=True)
        square_in = var_in + mean_in.square()
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = square_in.mean(1, keepdim=True) - mean_ln.square()
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = square_in.mean(0, keepdim=True) - mean_bn.square()
            self._update_running(mean_bn, var_bn, n * x3.shape[-1])
        else:
            mean_bn = self.running_mean.view(1, c, 1)
            var_bn = self.running_var.view(1, c, 1)
        wm = torch.softmax(self.mean_weight, 0)
        wv = torch.softmax(self.var_weight, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        y = ((x3 - mean) / (var + self.eps).sqrt()).view_as(x)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        m = self.momentum
        self.num_batches_tracked.add_(1)
        self.running_mean.mul_(1 - m).add_(mean.flatten(), alpha=m)
        self.running_var.mul_(1 - m).add_(var.flatten() * (count / (count - 1)), alpha=m)


# -- the benchmarked layers -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One layer at one shape: how to build normport's module and its twin."""

    layer: str
    shape: tuple[int, ...]
    make_normport: Callable[[], nn.Module]
    make_twin: Callable[[], nn.Module]
    twin: str


def build_cases() -> list[Case]:
    """The benchmarked layers at realistic shapes (transformer tokens, CNN feature maps)."""
    tokens = (32, 128, 768)
    fmap = (8, 256, 28, 28)
    return [
        Case(
            "LayerNorm",
            tokens,
            lambda: models.LayerNorm(768),
            lambda: nn.LayerNorm(768),
            "torch.nn.LayerNorm",
        ),
        Case(
            "RMSNorm",
            tokens,
            lambda: models.RMSNorm(768),
            lambda: nn.RMSNorm(768),
            "torch.nn.RMSNorm",
        ),
        Case(
            "SequenceBatchNorm",
            tokens,
            lambda: models.SequenceBatchNorm(768),
            lambda: TorchSequenceBatchNorm(768),
            "torch.nn.BatchNorm1d on x.transpose(1, 2) (models.TorchSequenceBatchNorm)",
        ),
        Case(
            "BatchNorm2d",
            fmap,
            lambda: models.BatchNorm2d(256),
            lambda: nn.BatchNorm2d(256),
            "torch.nn.BatchNorm2d",
        ),
        Case(
            "GroupNorm",
            fmap,
            lambda: models.GroupNorm(32, 256),
            lambda: nn.GroupNorm(32, 256),
            "torch.nn.GroupNorm",
        ),
        Case(
            "InstanceNorm2d",
            fmap,
            lambda: models.InstanceNorm2d(256, affine=True),
            lambda: nn.InstanceNorm2d(256, affine=True),
            "torch.nn.InstanceNorm2d(affine=True)",
        ),
        Case(
            "SwitchableNorm2d",
            fmap,
            lambda: models.SwitchableNorm2d(256),
            lambda: ReferenceSwitchableNorm2d(256),
            "composite reference in plain torch ops (benchmarks.layers.ReferenceSwitchableNorm2d)",
        ),
    ]


def select_cases(cases: list[Case], names: Sequence[str] | None) -> list[Case]:
    """The cases whose layer name is in ``names`` (case-insensitive); all when ``names`` is None."""
    if not names:
        return cases
    wanted = {name.strip().lower() for name in names if name.strip()}
    known = {case.layer.lower() for case in cases}
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(
            f"unknown layer(s) {unknown}; choose from {[case.layer for case in cases]}"
        )
    return [case for case in cases if case.layer.lower() in wanted]


# -- modules, inputs and one step -------------------------------------------------------------


def randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Give every floating parameter and buffer a random, non-trivial value (in place).

    Scales and variances stay positive; running statistics look like a trained network's.
    """
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
            if leaf in ("weight", "running_var"):
                value = torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype) + 0.5
            elif leaf in ("mean_weight", "var_weight"):
                value = noise
            else:  # bias, running_mean
                value = 0.2 * noise
            tensor.copy_(value)


def make_pair(
    case: Case, gen: torch.Generator, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """normport's module with random state and its twin loaded from the same state_dict."""
    ours = case.make_normport()
    randomize_(ours, gen)
    ours.to(device)
    twin = case.make_twin().to(device)
    twin.load_state_dict(ours.state_dict(), strict=True)
    return ours, twin


def make_inputs(
    shape: tuple[int, ...], gen: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A shifted, scaled random input and a fixed random output gradient."""
    x = torch.randn(shape, generator=gen) * 2.0 + 0.5
    grad = torch.randn(shape, generator=gen)
    return x.to(device), grad.to(device)


def _reset_grads(module: nn.Module, x: Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)


def make_step(
    module: Callable[[Tensor], Tensor], params: nn.Module, mode: str, x: Tensor, grad: Tensor
) -> Step:
    """The step of ``mode``: an eval forward, or a train forward + backward.

    ``module`` is what is called (possibly a ``torch.compile`` wrapper); ``params`` is the
    underlying module, whose train/eval flag is set and whose gradients are reset.
    """
    params.train(mode == "train")
    if mode == "eval":
        x_eval = x.detach()

        def run_eval() -> None:
            with torch.no_grad():
                module(x_eval)

        return Step(prepare=lambda: None, run=run_eval)

    x_train = x.detach().requires_grad_(True)

    def run_train() -> None:
        module(x_train).backward(grad)

    return Step(prepare=lambda: _reset_grads(params, x_train), run=run_train)


# -- numerical agreement ----------------------------------------------------------------------


def outputs_of(
    module: Callable[[Tensor], Tensor], params: nn.Module, mode: str, x: Tensor, grad: Tensor
) -> dict[str, Tensor]:
    """What one step produces: ``y`` and, in train mode, the gradients of input and parameters."""
    params.train(mode == "train")
    if mode == "eval":
        with torch.no_grad():
            return {"y": module(x.detach())}
    xg = x.detach().requires_grad_(True)
    params.zero_grad(set_to_none=True)
    y = module(xg)
    y.backward(grad)
    out = {"y": y.detach(), "x.grad": xg.grad}
    out.update(
        {f"{name}.grad": p.grad for name, p in params.named_parameters() if p.grad is not None}
    )
    return out


def max_diff(
    a: dict[str, Tensor], b: dict[str, Tensor], keys: Sequence[str], relative: bool = False
) -> float:
    """The largest ``|a - b|`` over ``keys``, or ``|a - b| / max(1, |b|)`` when ``relative``.

    The relative form suits sums over many elements (parameter gradients).  NaN where a key
    is missing, shapes differ or any difference is NaN.
    """
    worst = 0.0
    for key in keys:
        if key not in a or key not in b or a[key].shape != b[key].shape:
            return math.nan
        ref = b[key].double()
        diff = (a[key].double() - ref).abs()
        if relative:
            diff = diff / ref.abs().clamp_min(1.0)
        value = diff.max().item()
        if math.isnan(value):
            return math.nan
        worst = max(worst, value)
    return worst


@dataclass
class Agreement:
    """How closely normport matches its twin for one layer and mode."""

    max_abs_diff: float
    param_grad_max_rel_diff: float | None
    valid: bool


def check_agreement(
    ours: Callable[[Tensor], Tensor],
    ours_params: nn.Module,
    twin: Callable[[Tensor], Tensor],
    twin_params: nn.Module,
    mode: str,
    x: Tensor,
    grad: Tensor,
) -> Agreement:
    """Compare one step of both sides.

    ``max_abs_diff`` covers ``y`` and (train) the input gradient; parameter gradients are sums
    over thousands of elements, so they are compared relative to ``max(1, |grad|)``.  Both
    must stay below :data:`MAX_ABS_DIFF` for the row to be valid (a NaN never is).  The twin's
    state is reloaded from normport's afterwards, so the running statistics stay equal.
    """
    state = {k: v.clone() for k, v in ours_params.state_dict().items()}
    a = outputs_of(ours, ours_params, mode, x, grad)
    b = outputs_of(twin, twin_params, mode, x, grad)
    abs_keys = ["y", "x.grad"] if mode == "train" else ["y"]
    param_keys = sorted(k for k in a if k.endswith(".grad") and k != "x.grad")
    abs_diff = max_diff(a, b, abs_keys)
    rel_diff = max_diff(a, b, param_keys, relative=True) if mode == "train" else None
    ours_params.load_state_dict(state)
    twin_params.load_state_dict(state)
    _reset_grads(ours_params, x)
    _reset_grads(twin_params, x)
    diffs = [abs_diff] if rel_diff is None else [abs_diff, rel_diff]
    return Agreement(abs_diff, rel_diff, valid=all(d < MAX_ABS_DIFF for d in diffs))
