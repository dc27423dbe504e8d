"""normport layers inside real training code: in-place ops after the layer, torch.compile, and a
converted resnet18 trained with SGD, all against torch.nn running the same code.

Training code modifies a normalization layer's output in place (``nn.ReLU(inplace=True)``,
``nn.SiLU(inplace=True)``, a residual ``out += identity``).  That must work (autograd forbids
in-place ops on an output that is a view made inside a custom Function) and stay exact:
``relu_``'s backward reads its own output, ``silu_``'s a saved copy of its input.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from normport import models
from normport.models.randomize import randomize
from tests.cases import TWIN_CASES, LayerCase, make_input
from tests.test_switchable import paper_reference
from tests.tolerances import GRAD, OUTPUT


class ReferenceSwitchableNorm(nn.Module):
    """Switchable Norm's oracle (it has no torch.nn twin): the paper's equations in plain float64
    autograd (:func:`tests.test_switchable.paper_reference`), with the same state as
    :class:`models.SwitchableNorm2d` and the running-statistics rule of ``torch.nn.BatchNorm``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, device=device))
        self.mean_weight = nn.Parameter(torch.ones(3, **factory))
        self.var_weight = nn.Parameter(torch.ones(3, **factory))

    def forward(self, x: Tensor) -> Tensor:
        params = (self.mean_weight, self.var_weight, self.weight, self.bias, self.eps)
        stats = None if self.training else (self.running_mean, self.running_var)
        y, mean, var = paper_reference(x, *params, batch_stats=stats)
        if self.training:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                n = float(self.num_batches_tracked)
                m = 1.0 / n if self.momentum is None else self.momentum
                for buf, stat in ((self.running_mean, mean), (self.running_var, var)):
                    buf.copy_((1 - m) * buf.double() + m * stat)
        return y.to(x.dtype)


def _switchable_cases() -> list[LayerCase]:
    return [
        LayerCase(
            f"{cls.__name__}-{cfg_id}",
            cls,
            ReferenceSwitchableNorm,
            {"num_features": 5, **cfg},
            tuple((b, 5, *rest) for b in (4, 7, 2, 5, 3)),
            stateful=True,
        )
        for cls, rest, cfg_id, cfg in (
            (models.SwitchableNorm1d, (6,), "affine_momentum", {"momentum": 0.2}),
            (models.SwitchableNorm2d, (4, 3), "affine_cumulative_average", {"momentum": None}),
            (models.SwitchableNorm2d, (3, 3), "no_affine_eps", {"affine": False, "eps": 1e-3}),
        )
    ]


def _unbatched_instance_case() -> LayerCase:
    return LayerCase(
        "InstanceNorm2d-unbatched_affine_tracking",
        models.InstanceNorm2d,
        nn.InstanceNorm2d,
        {"num_features": 4, "affine": True, "track_running_stats": True, "momentum": 0.2},
        ((4, 5, 3), (4, 3, 6), (4, 5, 5)),
        stateful=True,
    )


# One or two configurations of every layer class, affine with running statistics where it has
# them (so eval uses the folded running-statistics path), plus the non-affine variants.
_PICKED = (
    "BatchNorm1d_2d-affine_momentum",
    "BatchNorm1d_3d-no_affine_momentum_eps",
    "BatchNorm2d-affine_momentum",
    "BatchNorm2d-affine_no_tracking",
    "BatchNorm3d-affine_cumulative_average",
    "SequenceBatchNorm-affine_momentum",
    "InstanceNorm1d-affine_tracking",
    "InstanceNorm2d-default",
    "InstanceNorm3d-affine_tracking_momentum_none",
    "GroupNorm-affine_3groups_2d",
    "GroupNorm-no_affine_eps_1d",
    "LayerNorm-affine_two_dims_eps",
    "LayerNorm-no_affine",
    "RMSNorm-affine_eps",
    "RMSNorm-no_affine",
)
_BY_ID = {c.id: c for c in TWIN_CASES}
CASES = [_BY_ID[i] for i in _PICKED] + _switchable_cases() + [_unbatched_instance_case()]


def test_every_layer_class_has_rows():
    """Every normport layer in ``models.__all__`` (not the torch.nn-side helpers) has a row."""
    torch_side = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    exported = (getattr(models, name) for name in models.__all__)
    layers = {
        obj
        for obj in exported
        if isinstance(obj, type) and issubclass(obj, nn.Module) and not issubclass(obj, torch_side)
    }
    assert layers == {c.ours for c in CASES}


def _relu_(y: Tensor, x: Tensor) -> Tensor:
    return nn.ReLU(inplace=True)(y)


def _silu_(y: Tensor, x: Tensor) -> Tensor:
    return nn.SiLU(inplace=True)(y)


def _add_residual_(y: Tensor, x: Tensor) -> Tensor:
    return y.add_(x)  # ResNet's `out += identity`


INPLACE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "relu_": _relu_,
    "silu_": _silu_,
    "add_": _add_residual_,
}


class Block(nn.Module):
    """``op(norm(x), x)`` with ``op`` modifying the layer's output in place."""

    def __init__(self, norm: nn.Module, op: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.norm, self.op = norm, op

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        out = self.op(y, x)
        assert out is y, "the op must work in place"
        return out


def _oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reduced precision is judged against torch.nn in float64 (see tests/test_parity.py)."""
    return torch.float64 if dtype in (torch.bfloat16, torch.float16) else dtype


def _close(actual: Tensor, expected: Tensor, tol: tuple[float, float], what: str) -> None:
    atol, rtol = tol
    actual = actual.to(expected.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _blocks(case: LayerCase, op: str, dtype: torch.dtype, seed: int) -> tuple[Block, Block]:
    ours, twin = case.build()
    randomize(ours, torch.Generator().manual_seed(seed))
    ours = ours.to(dtype)
    twin.load_state_dict(ours.state_dict(), strict=True)
    return Block(ours, INPLACE[op]), Block(twin.to(_oracle_dtype(dtype)), INPLACE[op])


def _run_steps(ours: nn.Module, twin: nn.Module, shapes, dtype, gen, label: str) -> None:
    """Forward, backward and state of ``ours`` against ``twin``, one step per input shape."""
    out_tol, grad_tol = OUTPUT[dtype], GRAD[dtype]
    for step, shape in enumerate(shapes):
        where = f"{label} step {step} {tuple(shape)}"
        x = make_input(shape, gen, dtype)
        xa = x.clone().requires_grad_(True)
        xb = x.to(_oracle_dtype(dtype)).requires_grad_(True)
        ya, yb = ours(xa), twin(xb)
        assert ya.dtype == dtype and ya.shape == yb.shape, where
        _close(ya, yb, out_tol, f"{where} output")
        grad = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
        ya.backward(grad.to(ya))
        yb.backward(grad.to(yb))
        _close(xa.grad, xb.grad, grad_tol, f"{where} grad input")
        pairs = zip(ours.named_parameters(), twin.named_parameters(), strict=True)
        for (name, pa), (_, pb) in pairs:
            _close(pa.grad, pb.grad, grad_tol, f"{where} grad {name}")
            pa.grad, pb.grad = None, None
        for (name, ba), (_, bb) in zip(ours.named_buffers(), twin.named_buffers(), strict=True):
            _close(ba, bb, out_tol, f"{where} buffer {name}")


# relu_ is float32 only: in reduced precision a value within rounding of 0 may take the other
# side of the kink than float64 does, a full-size gradient difference that is not a defect.
ROWS = [(op, torch.float32) for op in INPLACE] + [
    (op, dtype) for dtype in (torch.bfloat16, torch.float16) for op in ("silu_", "add_")
]


def _with_modes(cases: list[LayerCase]) -> list:
    """``(case, mode)`` rows: eval only for layers with running statistics (elsewhere eval runs
    the very same code as training)."""
    return [
        pytest.param(c, mode, id=f"{c.id}-{mode}")
        for c in cases
        for mode in (("train", "eval") if c.stateful else ("train",))
    ]


@pytest.mark.parametrize(("op", "dtype"), ROWS, ids=[f"{op}-{str(d)[6:]}" for op, d in ROWS])
@pytest.mark.parametrize(("case", "mode"), _with_modes(CASES))
def test_inplace_op_after_layer_matches_twin(case: LayerCase, mode: str, op: str, dtype):
    seed = zlib.crc32(case.id.encode())
    ours, twin = _blocks(case, op, dtype, seed)
    ours.train(mode == "train")
    twin.train(mode == "train")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    _run_steps(ours, twin, case.shapes, dtype, gen, f"{case.id} {mode}")
    if mode == "eval":
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())


# Unbatched InstanceNorm returns ``y.squeeze(0)``: a view, but one made outside the autograd
# Function, which autograd lets in-place ops rebase (its in-place rows above pass).
BATCHED = [c for c in CASES if "unbatched" not in c.id]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("case", "mode"), _with_modes(BATCHED))
def test_output_is_not_a_view(case: LayerCase, mode: str, dtype: torch.dtype):
    """The output is a fresh tensor, with or without autograd: nothing for in-place ops to trip on
    and no full-size copy made to get there."""
    layer = case.build()[0].to(dtype).train(mode == "train")
    x = make_input(case.shapes[0], torch.Generator().manual_seed(0), dtype)
    for requires_grad in (True, False):
        y = layer(x.clone().requires_grad_(requires_grad))
        assert y._base is None, f"{case.id} {mode} requires_grad={requires_grad}: a view"


# -- torch.compile ------------------------------------------------------------------------------

# aot_eager traces through dynamo and AOTAutograd (functionalization, where views and in-place
# ops are rewritten) without generating C++: seconds per row on 2 cores, where inductor spends a
# minute compiling kernels cold.
COMPILED = [
    ("BatchNorm2d-affine_momentum", "relu_", "train"),
    ("BatchNorm2d-affine_momentum", "relu_", "eval"),
    ("SequenceBatchNorm-affine_momentum", "add_", "train"),
    ("GroupNorm-affine_3groups_2d", "silu_", "train"),
    ("LayerNorm-affine_two_dims_eps", "add_", "train"),
    ("RMSNorm-affine_eps", "relu_", "train"),
]


@pytest.mark.slow  # 2-6 s a row on 2 busy cores, the first one 15 s (dynamo's warm-up)
@pytest.mark.parametrize(("case_id", "op", "mode"), COMPILED, ids=["-".join(r) for r in COMPILED])
def test_compiled_block_matches_twin(case_id: str, op: str, mode: str):
    torch._dynamo.reset()
    case = _BY_ID[case_id]
    seed = zlib.crc32(case.id.encode())
    ours, twin = _blocks(case, op, torch.float32, seed)
    ours.train(mode == "train")
    twin.train(mode == "train")
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = [case.shapes[0]] * 3  # one shape: one compilation
    _run_steps(compiled, twin, shapes, torch.float32, gen, f"compiled {case.id} {mode}")


@pytest.mark.slow  # 15 s with a warm inductor cache, 40-60 s cold
def test_inductor_conv_batchnorm_relu_matches_torch():
    """The full inductor pipeline on the block that first failed: Conv2d -> BatchNorm2d -> ReLU_."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    twin = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
    randomize(twin[1], gen)
    ours = models.convert(twin, to="normport")
    assert isinstance(ours[1], models.BatchNorm2d)
    compiled = torch.compile(ours)
    _run_steps(compiled, twin, [(4, 3, 9, 9)] * 3, torch.float32, gen, "inductor conv-bn-relu")


# -- a converted resnet18 trained with SGD --------------------------------------------------------


def _train(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> list[float]:
    # lr 0.01: with 0.05 the loss explodes (2.8 -> 79 in 4 steps) and float32 training turns
    # chaotic: torch.nn itself then drifts 80x this test's tolerance from a float64 run.
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    model.train()
    for x, target in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # ~27 s of CPU time, timm's import included
def test_converted_resnet18_trains_like_torch():
    """timm's resnet18 (BatchNorm2d -> ReLU(inplace=True), ``x += shortcut``) trained 4 SGD
    steps (momentum, weight decay) with torch.nn BatchNorm and converted to normport.

    Tolerance rtol 1e-4 / atol 1e-5: each layer agrees with torch.nn to float32 rounding
    (~1e-6 relative), which 20 BatchNorms, the backward pass through them and 4 optimizer
    steps with momentum amplify but keep well inside it (measured: the worst tensor, a
    running_mean, at 5% of the tolerance; torch.nn and normport are equally far from a float64
    run); a wrong term (bias, momentum, biased variance) is off by far more.
    """
    import tests.thirdparty._torchvision  # noqa: F401  (before timm, which imports torchvision)

    # isort: split
    import timm

    torch.manual_seed(0)
    original = timm.create_model("resnet18", pretrained=False, num_classes=10)
    gen = torch.Generator().manual_seed(18)
    norms = [m for m in original.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        randomize(m, gen)
    converted = models.convert(original, to="normport")
    ours = [m for m in converted.modules() if isinstance(m, models.BatchNorm2d)]
    assert len(ours) == len(norms) == 20
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in converted.modules())

    batches = [
        (torch.randn(4, 3, 64, 64, generator=gen), torch.randint(0, 10, (4,), generator=gen))
        for _ in range(4)
    ]
    start = {k: v.clone() for k, v in original.state_dict().items()}
    expected = _train(original, batches)
    actual = _train(converted, batches)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    theirs = original.state_dict()
    state = converted.state_dict()
    assert list(state) == list(theirs)
    for name, value in state.items():
        torch.testing.assert_close(
            value, theirs[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    # Guard against a test that cannot fail: training moved every weight and statistic.
    moved = [k for k, v in state.items() if not torch.equal(v, start[k])]
    assert moved == list(state), f"unchanged: {sorted(set(state) - set(moved))}"
