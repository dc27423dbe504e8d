"""What the benchmarks measure, named once: the layer cases and the served networks.

* :data:`LAYERS`: every benchmarked normport layer at one realistic shape.  The layer benchmark
  times each against its twin, eval and train (:mod:`benchmarks.layers`); the export benchmark
  exports each at its :attr:`~LayerCase.opsets` and runs the file in onnxruntime
  (:mod:`benchmarks.export`, part 1).  What a case is compared with follows from the layer
  table (:mod:`benchmarks.twins`), not from here.
* :data:`SERVED`: the zoo networks the serve benchmark drives, with the shape of one request.
  The zoo (:mod:`models.zoo`) is the one list of networks: the export benchmark's part 2 takes
  every one of them.
* :func:`layer_cases` / :func:`served_cases`: the cases a ``--layers`` / ``--models`` option
  names (:func:`pick`).

Nothing here imports torch: the serve benchmark reads :data:`SERVED` without it.

>>> [(case.layer, case.shape, case.call_args) for case in layer_cases(["groupnorm"])]
[('GroupNorm', (8, 256, 28, 28), '32, 256')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "FMAP",
    "LAYERS",
    "LOW_OPSET",
    "OPSETS",
    "SERVED",
    "TOKENS",
    "LayerCase",
    "ServedCase",
    "layer_cases",
    "pick",
    "served_cases",
]

TOKENS = (32, 128, 768)
"""Transformer activations ``(N, L, C)``: 32 sequences of 128 tokens, width 768."""

FMAP = (8, 256, 28, 28)
"""CNN feature maps ``(N, C, H, W)``: 8 images, 256 channels, 28 x 28."""

OPSETS = (17, 18, 21, 23)
"""The opsets the export benchmark exports every layer at."""

LOW_OPSET = 13
"""Also exported at this opset where normport lowers the layer to a function there (its
standard ONNX op arrives later: LayerNormalization 17, GroupNormalization 18,
RMSNormalization 23)."""


@dataclass(frozen=True)
class LayerCase:
    """One normport layer, its constructor arguments and the shape of its input.

    Attributes:
        layer: the class name in :mod:`models` (the ``layer`` of every report row and the
            ``--layers`` key); its twin takes the same arguments.
        shape: the input's shape.
        args, kwargs: the constructor arguments.
        opsets: the opsets the export benchmark exports the layer at.
    """

    layer: str
    shape: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    opsets: tuple[int, ...] = OPSETS

    @property
    def call_args(self) -> str:
        """The constructor arguments as written in a call: ``"256, affine=True"``."""
        keywords = (f"{key}={value!r}" for key, value in self.kwargs.items())
        return ", ".join([*map(repr, self.args), *keywords])

    def make(self) -> nn.Module:
        """normport's layer, with torch's default initialisation."""
        from normport import models  # lazy: reading the case list needs no torch

        return getattr(models, self.layer)(*self.args, **self.kwargs)


_WITH_LOW = (LOW_OPSET, *OPSETS)

LAYERS: tuple[LayerCase, ...] = (
    LayerCase("LayerNorm", TOKENS, (768,), opsets=_WITH_LOW),
    LayerCase("RMSNorm", TOKENS, (768,), opsets=_WITH_LOW),
    LayerCase("SequenceBatchNorm", TOKENS, (768,)),
    LayerCase("BatchNorm2d", FMAP, (256,)),
    LayerCase("GroupNorm", FMAP, (32, 256), opsets=_WITH_LOW),
    LayerCase("InstanceNorm2d", FMAP, (256,), {"affine": True}),
    LayerCase("SwitchableNorm2d", FMAP, (256,)),
)


@dataclass(frozen=True)
class ServedCase:
    """A zoo network as the serve benchmark drives it.

    Attributes:
        network: the zoo name (also the model's name in the repository).
        sample_shape: one request's input, one sample: the zoo's default dims, batch axis
            left out (its dtype and the input and output names are read off the served file).
    """

    network: str
    sample_shape: tuple[int, ...]


SERVED: tuple[ServedCase, ...] = (
    ServedCase("seq_bn", (16, 8)),  # small: the per-request overhead shows
    ServedCase("cnn_bn", (3, 32, 32)),  # a CNN: onnxruntime gains nothing from batching it
    # 16 int64 token ids (the serve benchmark reads each input's datatype off the file):
    # onnxruntime runs it 2x cheaper per sample at batch 16
    ServedCase("transformer_ln", (16,)),
)


def pick(known: Sequence[str], wanted: Sequence[str] | None, what: str) -> list[str]:
    """The names of ``known`` that ``wanted`` names (case-insensitive), in ``known``'s order;
    all of them when ``wanted`` is empty.

    Raises:
        SystemExit: ``wanted`` names something unknown (the message lists the choices).
    """
    if not wanted:
        return list(known)
    chosen = {name.strip().lower() for name in wanted if name.strip()}
    unknown = sorted(chosen - {name.lower() for name in known})
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    return [name for name in known if name.lower() in chosen]


def layer_cases(names: Sequence[str] | None = None) -> list[LayerCase]:
    """The layer cases ``names`` picks; all of :data:`LAYERS` when None."""
    chosen = pick([case.layer for case in LAYERS], names, "layer")
    return [case for case in LAYERS if case.layer in chosen]


def served_cases(names: Sequence[str] | None = None) -> list[ServedCase]:
    """The served networks ``names`` picks; all of :data:`SERVED` when None."""
    chosen = pick([case.network for case in SERVED], names, "served model")
    return [case for case in SERVED if case.network in chosen]
