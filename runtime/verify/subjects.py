"""What is verified: standalone layers, the zoo networks, and a user's own module.

A :class:`Subject` builds a fresh module (eval mode, deterministic) and draws batches of inputs
of any batch size.  Three sources:

- :data:`LAYERS`: one standalone normport layer per layer type and configuration, with random
  non-trivial parameters and running statistics (never ``gamma = 1``, ``beta = 0``,
  ``mean = 0``, ``var = 1``).  Their data has known per-channel statistics
  (:attr:`Subject.data_stats`), so the divergence study can say where running statistics should
  converge.
- the zoo (:mod:`models.zoo`): every network, built with ``seed=0``.
- ``--module pkg.mod:factory`` (:func:`from_factory`), loaded and checked by
  :mod:`export.factory`, which states the **factory contract**: a callable with no required
  arguments returning ``(module, example_inputs)`` or a module with an
  ``example_inputs(batch_size: int, seed: int)`` method.

  The module is exported as it is (:func:`export.to_onnx` takes any model: torch.nn norms,
  their subclasses, functional and hand-written norms), while the PyTorch side runs the same
  module.  Axis 0 of every input is exported as the dynamic batch axis.  With only
  ``example_inputs`` to go on, batches of other sizes are resampled from it: float inputs as
  ``mean + std * N(0, 1)`` with the example's per-feature mean and std, integer inputs drawn
  uniformly from the example's value range.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from normport import models
from normport.export import factory
from normport.models import zoo
from normport.models.randomize import randomize as _randomize

__all__ = ["LAYERS", "Subject", "from_factory", "get", "layer_names", "names", "zoo_subject"]

InputFn = Callable[[int, int, bool], tuple[Tensor, ...]]  # (batch_size, seed, alt_sizes)


@dataclass(frozen=True)
class Subject:
    """One thing to verify.

    Attributes:
        name: ``BatchNorm2d-momentum``, ``cnn_bn``, ``pkg.mod:factory``.
        kind: ``"layer"``, ``"network"`` or ``"module"`` (a user's; tolerances as networks).
        family: the layer type for the divergence study (``"BatchNorm2d"``), or the name.
        description: one line.
        factory: a fresh module in eval mode; the one PyTorch runs.
        inputs: ``(batch_size, seed, alt)`` -> one batch; ``alt`` picks other sizes for the
            non-batch dynamic axes (several shapes through one exported file).
        input_names, output_names: graph names (None: the exporter's defaults).
        dynamic: ``{input: {axis: name}}`` for the export.
        channel_axis: layers only: the axis statistics are kept per.
        data_stats: layers only: the data's per-channel ``(mean, variance)``.
    """

    name: str
    kind: str
    family: str
    description: str
    factory: Callable[[], nn.Module] = field(repr=False)
    inputs: InputFn = field(repr=False)
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    dynamic: dict[str, dict[int, str]] | bool = True
    channel_axis: int | None = None
    data_stats: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def scope(self) -> str:
        """Tolerance scope: ``"layer"`` or ``"network"``."""
        return "layer" if self.kind == "layer" else "network"

    def stateful(self, module: nn.Module) -> dict[str, nn.Module]:
        """The layers of ``module`` that keep running statistics, by module path."""
        return {
            path: m
            for path, m in module.named_modules()
            if getattr(m, "track_running_stats", False)
            and getattr(m, "num_batches_tracked", None) is not None
        }


# -- standalone layers ------------------------------------------------------------------------


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """:func:`models.randomize.randomize` from ``seed``, in eval mode."""
    return _randomize(module, torch.Generator().manual_seed(seed)).eval()


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class _LayerCase:
    name: str
    family: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]  # batch axis first; its size is replaced
    alt: tuple[int, ...]  # another size of every non-batch dynamic axis
    channel_axis: int
    dynamic_axes: tuple[int, ...]


_IMAGE, _IMAGE_ALT = (4, 6, 5, 5), (4, 6, 7, 4)
_SEQ, _SEQ_ALT = (4, 7, 6), (4, 3, 6)
_TOKENS, _TOKENS_ALT = (4, 5, 8), (4, 2, 8)

_CASES = (
    _LayerCase(
        "BatchNorm2d-momentum", "BatchNorm2d", lambda: models.BatchNorm2d(6), _IMAGE, _IMAGE_ALT,
        1, (0, 2, 3),
    ),
    _LayerCase(
        "BatchNorm2d-cumulative", "BatchNorm2d",
        lambda: models.BatchNorm2d(6, momentum=None, eps=1e-3), _IMAGE, _IMAGE_ALT, 1, (0, 2, 3),
    ),
    _LayerCase(
        "BatchNorm1d-no_affine", "BatchNorm1d",
        lambda: models.BatchNorm1d(5, affine=False, momentum=0.3), (4, 5, 9), (4, 5, 4), 1,
        (0, 2),
    ),
    _LayerCase(
        "SequenceBatchNorm", "SequenceBatchNorm", lambda: models.SequenceBatchNorm(6), _SEQ,
        _SEQ_ALT, -1, (0, 1),
    ),
    _LayerCase(
        "InstanceNorm2d-tracked", "InstanceNorm2d (tracked)",
        lambda: models.InstanceNorm2d(6, affine=True, track_running_stats=True), _IMAGE,
        _IMAGE_ALT, 1, (0, 2, 3),
    ),
    _LayerCase(
        "InstanceNorm2d-untracked", "InstanceNorm2d (untracked)",
        lambda: models.InstanceNorm2d(6, affine=True), _IMAGE, _IMAGE_ALT, 1, (0, 2, 3),
    ),
    _LayerCase(
        "GroupNorm", "GroupNorm", lambda: models.GroupNorm(3, 6), _IMAGE, _IMAGE_ALT, 1,
        (0, 2, 3),
    ),
    _LayerCase(
        "LayerNorm", "LayerNorm", lambda: models.LayerNorm(8), _TOKENS, _TOKENS_ALT, -1, (0, 1),
    ),
    _LayerCase(
        "RMSNorm", "RMSNorm", lambda: models.RMSNorm(8, eps=1e-6), _TOKENS, _TOKENS_ALT, -1,
        (0, 1),
    ),
    _LayerCase(
        "SwitchableNorm2d-momentum", "SwitchableNorm2d", lambda: models.SwitchableNorm2d(6),
        _IMAGE, _IMAGE_ALT, 1, (0, 2, 3),
    ),
    _LayerCase(
        "SwitchableNorm2d-cumulative", "SwitchableNorm2d",
        lambda: models.SwitchableNorm2d(6, momentum=None), _IMAGE, _IMAGE_ALT, 1, (0, 2, 3),
    ),
)  # fmt: skip


def _layer_subject(case: _LayerCase) -> Subject:
    """Data ``x = mean_c + std_c * N(0, 1)`` per channel, away from 0 and 1 on purpose."""
    gen = torch.Generator().manual_seed(_seed(case.name) + 1)
    channels = case.shape[case.channel_axis]
    mean = 1.0 + torch.randn(channels, generator=gen, dtype=torch.float64)
    std = 0.5 + 2.0 * torch.rand(channels, generator=gen, dtype=torch.float64)
    view = [1] * len(case.shape)
    view[case.channel_axis] = channels

    def inputs(batch_size: int, seed: int, alt: bool = False) -> tuple[Tensor]:
        shape = (batch_size, *(case.alt if alt else case.shape)[1:])
        z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return ((mean.view(view) + std.view(view) * z).float(),)

    return Subject(
        name=case.name,
        kind="layer",
        family=case.family,
        description=repr(case.make()),
        factory=lambda: randomize(case.make(), _seed(case.name)),
        inputs=inputs,
        input_names=("input",),
        output_names=("output",),
        dynamic={"input": {a: f"d{a}" if a else "batch" for a in case.dynamic_axes}},
        channel_axis=case.channel_axis,
        data_stats=(mean, std.square()),
    )


LAYERS: dict[str, Subject] = {case.name: _layer_subject(case) for case in _CASES}


def layer_names() -> list[str]:
    return list(LAYERS)


# -- zoo networks -----------------------------------------------------------------------------


def zoo_subject(name: str) -> Subject:
    spec = zoo.get(name)
    alt_dims = {k: v + 4 for k, v in spec.dims.items()}

    def inputs(batch_size: int, seed: int, alt: bool = False) -> tuple[Tensor, ...]:
        return spec.example_inputs(batch_size, seed=seed, **(alt_dims if alt else {}))

    return Subject(
        name=name,
        kind="network",
        family=name,
        description=spec.description,
        factory=lambda: spec.build(seed=0),
        inputs=inputs,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic=spec.dynamic_dims,
    )


def names() -> list[str]:
    """Every built-in subject: the layers, then the zoo networks."""
    return layer_names() + zoo.names()


def get(name: str) -> Subject:
    """A layer or zoo subject by name.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name in LAYERS:
        return LAYERS[name]
    if name in zoo.names():
        return zoo_subject(name)
    raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}")


# -- a user's module --------------------------------------------------------------------------


def _resampler(example: tuple[Tensor, ...]) -> InputFn:
    def inputs(batch_size: int, seed: int, alt: bool = False) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        drawn = []
        for t in example:
            shape = (batch_size, *t.shape[1:])
            if t.is_floating_point():
                mean = t.double().mean(0)
                std = t.double().std(0) if t.shape[0] > 1 else t.double().std()
                z = torch.randn(shape, generator=gen, dtype=torch.float64)
                drawn.append((mean + std * z).to(t.dtype))
            else:
                low, high = int(t.min()), int(t.max()) + 1
                drawn.append(torch.randint(low, high, shape, generator=gen, dtype=t.dtype))
        return tuple(drawn)

    return inputs


def from_factory(target: str) -> Subject:
    """A subject from ``"pkg.mod:factory"`` (contract: :mod:`export.factory`).

    Raises:
        export.factory.FactoryError: ``target`` is not ``pkg.mod:factory``, the module does not
            import, has no such attribute, or the factory raises; its
            :class:`~export.factory.FactoryTypeError` (also a ``TypeError``): a non-callable, or
            a return value outside the contract.
    """
    made = factory.build(target)  # once: a factory need not be deterministic
    module = made.module.eval()
    if made.sample is None:
        input_fn = _resampler(made.example)
    else:
        sample = made.sample

        def input_fn(batch_size: int, seed: int, alt: bool = False) -> tuple[Tensor, ...]:
            return sample(batch_size, seed)

    return Subject(
        name=target,
        kind="module",
        family=target,
        description=f"{type(module).__module__}.{type(module).__qualname__}",
        factory=lambda: copy.deepcopy(module),
        inputs=input_fn,
    )
