"""``ZooSpec``: everything needed to build, feed and export one example network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from normport.models.zoo._calibrate import calibrate

__all__ = ["InputFn", "Interface", "ZooSpec"]

# ``(batch_size, generator, **dims) -> inputs``: draws one batch of example inputs.
InputFn = Callable[..., tuple[Tensor, ...]]

# Warm-up batches are drawn like the example inputs, then floats are mapped ``x * 2 + 1``:
# running statistics then land clearly away from 0 (mean) and 1 (variance).
_WARMUP_SCALE = 2.0
_WARMUP_SHIFT = 1.0
_WARMUP_STEPS = 4
_WARMUP_BATCH = 8


@dataclass(frozen=True)
class Interface:
    """How a family of networks is fed and what it returns (the :class:`ZooSpec` fields of the
    same names): every image classifier shares one, every token model another.
    """

    input_fn: InputFn
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_dims: dict[str, dict[int, str]]
    dims: dict[str, int]


@dataclass(frozen=True)
class ZooSpec:
    """One example network of the zoo.

    Attributes:
        name: the registry key.
        description: one line saying what the network is.
        factory: builds the bare module (torch's default initialisation, global RNG).
        input_fn: ``(batch_size, generator, **dims)`` -> one batch of example inputs.
        input_names, output_names: the graph's input / output names, in forward order.
        dynamic_dims: input name -> ``{axis: symbolic name}``; axis 0 is always ``"batch"``.
        dims: default size of every symbolic dimension except ``"batch"`` (e.g. ``seq_len``);
            these are the keyword arguments :meth:`example_inputs` accepts.
    """

    name: str
    description: str
    factory: Callable[[], nn.Module] = field(repr=False)
    input_fn: InputFn = field(repr=False)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_dims: dict[str, dict[int, str]]
    dims: dict[str, int]

    def build(self, seed: int = 0) -> nn.Module:
        """The network with seeded weights, random norm affines and warmed-up running stats.

        Deterministic in ``seed``; the global RNG state is left as it was.  Returned in eval
        mode.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.factory()
        generator = torch.Generator().manual_seed(1_000_003 + seed)
        batches = [
            tuple(
                t * _WARMUP_SCALE + _WARMUP_SHIFT if t.is_floating_point() else t
                for t in self.input_fn(_WARMUP_BATCH, generator, **self.dims)
            )
            for _ in range(_WARMUP_STEPS)
        ]
        calibrate(model, generator, batches)
        return model.eval()

    def example_inputs(
        self, batch_size: int = 2, *, seed: int = 0, **dims: int
    ) -> tuple[Tensor, ...]:
        """Deterministic example inputs; ``dims`` overrides sizes in :attr:`dims`.

        Raises:
            TypeError: a keyword names no dimension of this network.
        """
        unknown = sorted(set(dims) - set(self.dims))
        if unknown:
            raise TypeError(
                f"{self.name}: unknown dimension(s) {unknown}; known: {sorted(self.dims)}"
            )
        generator = torch.Generator().manual_seed(seed)
        return self.input_fn(batch_size, generator, **{**self.dims, **dims})
