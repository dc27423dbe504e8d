"""Hand-written RMSNorm (LLaMA / Qwen2 / T5 style) -> one RMSNormalization / normport.RMSNorm."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.recognize.harness import check_matched, check_not_matched, layers, randomize
from tests.tolerances import OUTPUT

D = 12
SHAPE = (2, 5, D)


def rms_node(opset: int) -> str:
    return "RMSNormalization" if opset >= 23 else "normport.RMSNorm"


class LlamaStyle(nn.Module):
    """transformers' LlamaRMSNorm / Qwen2RMSNorm forward, verbatim."""

    def __init__(self, hidden: int = D, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5Style(nn.Module):
    """transformers' T5LayerNorm forward, verbatim: the uncast x times the float32 rsqrt."""

    def __init__(self, hidden: int = D, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class Variant(nn.Module):
    """One spelling of ``x * rsqrt(mean(x ** 2) + eps) [* w]`` per ``form``."""

    def __init__(self, form: str, shape: tuple[int, ...] = (D,), eps: float = 1e-5):
        super().__init__()
        self.form, self.eps = form, eps
        self.weight = None if form == "no_weight" else nn.Parameter(torch.ones(shape))
        if form == "eps_tensor":
            self.register_buffer("eps_t", torch.tensor(eps))
        self.dims = tuple(range(-len(shape), 0))

    def forward(self, x: Tensor) -> Tensor:
        f, eps, dims = self.form, self.eps, self.dims
        if f == "x_times_x":
            y = x * torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
        elif f == "one_over_sqrt":
            y = x * (1 / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + eps))
        elif f == "div_sqrt":
            y = x / torch.sqrt(torch.square(x).mean(dims, keepdim=True) + eps)
        elif f == "pow_minus_half":
            y = x * (x.pow(2).mean(dims, keepdim=True) + eps) ** -0.5
        elif f == "eps_tensor":
            y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self.eps_t)
        elif f == "eps_made_in_forward":  # lifted by export, then lift_fresh_copy + detach_
            y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + torch.tensor(eps))
        elif f == "unsqueeze":  # keepdim=False, then the axis back: the same values
            y = x * torch.rsqrt(x.pow(2).mean(-1).unsqueeze(-1) + eps)
        else:  # no_weight, weight_right, two_axes
            y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y if self.weight is None else y * self.weight


VARIANTS = [
    "x_times_x",
    "one_over_sqrt",
    "div_sqrt",
    "pow_minus_half",
    "eps_tensor",
    "eps_made_in_forward",
    "unsqueeze",
    "no_weight",
    "weight_right",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("style", [LlamaStyle, T5Style], ids=["llama", "t5"])
def test_transformers_styles(style, dtype):
    module = randomize(style()).to(dtype)
    models = check_matched(module, SHAPE, "rmsnorm", rms_node, dtype=dtype, label=style.__name__)
    node = models[23].graph.node[0]
    attrs = {a.name: a for a in node.attribute}
    assert attrs["epsilon"].f == pytest.approx(1e-6)
    assert attrs["stash_type"].i == 1  # statistics in float32, as the up-cast asks


@pytest.mark.parametrize("form", VARIANTS)
def test_spellings(form):
    check_matched(randomize(Variant(form)), SHAPE, "rmsnorm", rms_node, label=form)


def test_trailing_two_axes():
    models = check_matched(randomize(Variant("two_axes", (5, D))), SHAPE, "rmsnorm", rms_node)
    attrs = {a.name: a for a in models[23].graph.node[0].attribute}
    assert attrs["axis"].i == -2


def test_transformers_classes():
    # first: transformers imports torchvision, which needs this to load (run alone, this file
    # failed with "operator torchvision::nms does not exist")
    from tests.thirdparty._torchvision import torchvision  # noqa: F401, I001

    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for cls in (LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm):
        models = check_matched(randomize(cls(D)), SHAPE, "rmsnorm", rms_node, label=cls.__name__)
        assert [e["cls"] for e in layers(models[23])] == [cls.__name__]


class NearMiss(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x: Tensor):
        f, eps = self.form, 1e-5
        if f == "mean_over_-2":
            return x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + eps) * self.weight
        if f == "pow_3":
            return x * torch.rsqrt(x.pow(3).abs().mean(-1, keepdim=True) + eps) * self.weight
        if f == "eps_outside_root":
            return x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + eps) * self.weight
        if f == "eps_after_rsqrt":
            return x * (torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) + eps) * self.weight
        if f == "shared_mean_square":
            ms = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(ms + eps) * self.weight, ms
        if f == "half_statistics":  # a cast to a narrower type inside the statistics
            ms = x.half().pow(2).mean(-1, keepdim=True).float()
            return x * torch.rsqrt(ms + eps) * self.weight
        if f == "other_value":  # the numerator is not the value squared
            return (x + 1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        raise AssertionError(f)


@pytest.mark.parametrize(
    "form",
    [
        "mean_over_-2",
        "pow_3",
        "eps_outside_root",
        "eps_after_rsqrt",
        "shared_mean_square",
        "half_statistics",
        "other_value",
    ],
)
def test_near_misses_are_left_alone(form):
    # half_statistics: the primitives' float16 reduction rounds where PyTorch's accumulates
    tolerance = OUTPUT[torch.float16] if form == "half_statistics" else None
    check_not_matched(randomize(NearMiss(form)), SHAPE, label=form, tolerance=tolerance)


def test_float32_weight_on_half_activations_is_left_alone():
    """T5LayerNorm with float32 weights on float16 activations computes the weight multiply in
    float32: the match ends before the weight, where the value is float32, not the input's
    float16, so nothing is replaced and the primitives keep the numbers."""

    class Mixed(T5Style):
        def forward(self, x):
            return super().forward(x).to(x.dtype)

    check_not_matched(randomize(Mixed()), SHAPE, dtype=torch.float16)
