"""The registry of lowerings: one entry per layer kind, each stating what it emits per opset.

Adding a layer touches one place: a module here that calls :func:`register`.  Where a layer
has several exact forms (the standard op, a function, a folded form), its lowering emits the
one :func:`export.lowerings._choices.choose` reads from the form table for the opset and the
export's target; such a layer also adds its rows, with their measurements, to that table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec

__all__ = [
    "REGISTRY",
    "Layout",
    "Lowering",
    "affine_inputs",
    "batch_normalization",
    "call",
    "lowering_for",
    "node_name",
    "op",
    "register",
]

LowerFn = Callable[[Emitter, LayerSpec, Inputs, list[str]], None]


@dataclass(frozen=True)
class Lowering:
    kind: str
    lower: LowerFn
    eps_outside_root: bool = False  # also lowers specs with eps_in_root=False


REGISTRY: dict[str, Lowering] = {}


def register(kind: str, *, eps_outside_root: bool = False) -> Callable[[LowerFn], LowerFn]:
    def decorate(fn: LowerFn) -> LowerFn:
        REGISTRY[kind] = Lowering(kind, fn, eps_outside_root)
        return fn

    return decorate


def lowering_for(spec: LayerSpec) -> Lowering:
    try:
        lowering = REGISTRY[spec.kind]
    except KeyError:
        raise ValueError(
            f"no lowering for layer {spec.path!r} ({spec.cls}, kind {spec.kind!r})"
        ) from None
    # (x - mean) / (sqrt(var) + eps) is other math than every standard op: a lowering that
    # did not say it handles it must not emit its eps-in-the-root op for it.
    if not spec.eps_in_root and not lowering.eps_outside_root:
        raise ValueError(
            f"layer {spec.path or '<root>'!r} ({spec.cls}, kind {spec.kind!r}) has eps outside "
            "the root, (x - mean) / (sqrt(var) + eps), which the lowering of that kind does not "
            "export; kinds that do: "
            + ", ".join(sorted(k for k, low in REGISTRY.items() if low.eps_outside_root))
        )
    return lowering


@dataclass(frozen=True)
class Layout:
    """Where a layer's statistics are taken: the ``axes`` reduced, and the ``channel_shape``
    its per-channel scale and bias are reshaped to (``[C, 1, 1]`` for ``(N, C, H, W)``)."""

    axes: tuple[int, ...]
    channel_shape: tuple[int, ...]

    @classmethod
    def channels_first(cls, spec: LayerSpec, *, per_instance: bool = False) -> Layout:
        """``(N, C, *)``: over N and the spatial axes, or the spatial axes alone."""
        spatial = tuple(range(2, spec.rank))
        return cls(
            spatial if per_instance else (0, *spatial), (spec.channels,) + (1,) * len(spatial)
        )

    @classmethod
    def channels_last(cls, spec: LayerSpec) -> Layout:
        """``(N, L, C)``: over every axis but the last."""
        return cls(tuple(range(spec.rank - 1)), (spec.channels,))

    @classmethod
    def trailing(cls, spec: LayerSpec) -> Layout:
        """LayerNorm's: over the trailing ``normalized_shape``, which the affine has."""
        return cls(tuple(range(-spec.normalized_ndim, 0)), tuple(spec.normalized_shape))

    def attrs(self) -> dict[str, list[int]]:
        """The ``axes`` and ``channel_shape`` attributes of a function call."""
        return {"axes": list(self.axes), "channel_shape": list(self.channel_shape)}


def affine_inputs(em: Emitter, spec: LayerSpec, ins: Inputs, shape=None) -> tuple[str, str]:
    """Scale and bias names; ones / zeros constants where the layer has no affine."""
    shape = (spec.channels,) if shape is None else shape
    scale = ins.weight or em.filled(f"{spec.path}.scale_ones", shape, 1.0)
    bias = ins.bias or em.filled(f"{spec.path}.bias_zeros", shape, 0.0)
    return scale, bias


def batch_normalization(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    """Inference with running statistics: one standard ``BatchNormalization`` (opsets 13-28)."""
    scale, bias = affine_inputs(em, spec, ins)
    stats = [ins.running_mean, ins.running_var]
    op(em, spec, "BatchNormalization", [ins.x, scale, bias, *stats], outs, epsilon=spec.eps)


def node_name(spec: LayerSpec, op: str) -> str:
    """Node names follow module paths, so the graph reads well in a viewer."""
    return f"{spec.path or spec.cls}/{op}"


def op(
    em: Emitter, spec: LayerSpec, op_type: str, inputs: list[str], outs: list[str], **attrs
) -> None:
    """The layer as one standard op: its output is the layer's (``outs[0]``)."""
    em.node(op_type, inputs, outs[:1], name=node_name(spec, op_type), **attrs)


def call(
    em: Emitter,
    spec: LayerSpec,
    function: onnx.FunctionProto,
    inputs: list[str],
    outs: list[str],
    **attrs,
) -> None:
    """The layer as one call of ``function``, with as many of ``outs`` as it has outputs."""
    outputs = outs[: len(function.output)]
    em.call(function, inputs, outputs, name=node_name(spec, function.name), **attrs)


# Importing the modules registers their lowerings.
from normport.export.lowerings import (  # noqa: E402, F401
    batchnorm,
    eps_outside,
    groupnorm,
    instancenorm,
    layernorm,
    switchable,
)
