"""A layer case's modules: normport's layer with random state, and the twin it is compared with.

A twin takes the case's constructor arguments and normport's state_dict.  It is the layer's
torch.nn twin from the one layer table (:data:`models.table.LAYERS`: ``torch.nn.GroupNorm``,
``models.TorchSequenceBatchNorm``, ...) or, where torch.nn has none, the plain-torch composite
a user would write without normport (:data:`REFERENCES`).  The layer benchmark times normport
against either (:func:`twin_class`); the export benchmark exports torch.nn twins only
(:func:`torch_twin`).

>>> from benchmarks.cases import layer_cases
>>> gen = torch.Generator().manual_seed(0)
>>> (case,) = layer_cases(["GroupNorm"])
>>> ours = make_layer(case, gen)
>>> twin = make_twin(twin_class(case), case, ours)  # torch.nn.GroupNorm(32, 256), same state
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmarks.cases import LayerCase
from normport import models

__all__ = [
    "REFERENCES",
    "ReferenceSwitchableNorm2d",
    "make_input",
    "make_layer",
    "make_twin",
    "randomize_",
    "torch_twin",
    "twin_class",
    "twin_name",
]


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
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

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


REFERENCES: dict[str, type[nn.Module]] = {"SwitchableNorm2d": ReferenceSwitchableNorm2d}
"""normport layers torch.nn has no twin of -> the plain-torch composite they are compared with."""


def torch_twin(case: LayerCase) -> type[nn.Module] | None:
    """The case's torch.nn twin in the layer table, None where torch.nn has none."""
    cls = getattr(models, case.layer)
    row = next((row for row in models.table.LAYERS if row.normport is cls), None)
    if row is None:
        raise ValueError(f"{case.layer} is not in the layer table (models.table.LAYERS)")
    return row.torch


def twin_class(case: LayerCase) -> type[nn.Module]:
    """What the case is timed against: its torch.nn twin, else its entry in :data:`REFERENCES`."""
    twin = torch_twin(case) or REFERENCES.get(case.layer)
    if twin is None:
        raise ValueError(f"{case.layer} has no torch.nn twin and no entry in REFERENCES")
    return twin


def twin_name(case: LayerCase) -> str:
    """The twin as a call, for reports: ``"torch.nn.InstanceNorm2d(256, affine=True)"``."""
    cls = twin_class(case)
    for prefix, namespace in (("torch.nn", nn), ("models", models)):
        if getattr(namespace, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}({case.call_args})"
    return f"{cls.__module__}.{cls.__qualname__}({case.call_args})"


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


def make_layer(case: LayerCase, gen: torch.Generator) -> nn.Module:
    """normport's layer of ``case`` with random, non-trivial state (:func:`randomize_`)."""
    module = case.make()
    randomize_(module, gen)
    return module


def make_twin(cls: type[nn.Module], case: LayerCase, module: nn.Module) -> nn.Module:
    """``cls(*case.args, **case.kwargs)`` holding a copy of ``module``'s state, in its mode."""
    twin = cls(*case.args, **case.kwargs)
    twin.load_state_dict(module.state_dict(), strict=True)
    return twin.train(module.training)


def make_input(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """A shifted, scaled random input (``2 N(0, 1) + 0.5``): no zero-mean, unit-scale luck."""
    return torch.randn(shape, generator=gen) * 2.0 + 0.5
