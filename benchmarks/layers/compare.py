"""Both sides of a layer case, one timed step, and their numerical agreement.

* :func:`make_pair` / :func:`make_inputs`: normport's layer and its twin with the same random,
  non-trivial state (:mod:`benchmarks.twins`), the same input and output gradient;
* :func:`make_step`: the timed step of a mode (eval forward, or train forward + backward);
* :func:`check_agreement`: outputs and gradients compared before timing (:data:`MAX_ABS_DIFF`).

The cases themselves are :data:`benchmarks.cases.LAYERS`, shared with the export benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.cases import LayerCase
from benchmarks.timing import Step
from benchmarks.twins import make_input, make_layer, make_twin, twin_class

__all__ = [
    "MAX_ABS_DIFF",
    "MODES",
    "SEED",
    "Agreement",
    "check_agreement",
    "make_inputs",
    "make_pair",
    "make_step",
    "max_diff",
    "outputs_of",
]

MAX_ABS_DIFF = 1e-3
"""normport and its twin must agree to below this (outputs and input gradients)."""

MODES = ("eval", "train")
SEED = 0


# -- modules, inputs and one step -------------------------------------------------------------


def make_pair(
    case: LayerCase, gen: torch.Generator, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """normport's layer with random state and its twin loaded from the same state_dict."""
    ours = make_layer(case, gen)
    twin = make_twin(twin_class(case), case, ours)
    return ours.to(device), twin.to(device)


def make_inputs(
    shape: tuple[int, ...], gen: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A shifted, scaled random input (:func:`benchmarks.twins.make_input`) and a fixed random
    output gradient."""
    x = make_input(shape, gen)
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
