"""GroupNorm: ``GroupNormalization`` (opset 21's per-channel scale and bias, ``stash_type=1``)
from opset 21; below it the function ``normport.GroupNorm`` (reshape to ``(N, G, -1)``,
InstanceNormalization, reshape back, per-channel affine).  The deprecated opset-18 form, whose
scale and bias are per *group*, is never emitted: onnx's checker rejects it in opsets 18-20.
"""

from __future__ import annotations

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import affine_inputs, node_name, register

STANDARD_OPSET = 21


def _function(em: Emitter):
    b = em.body()
    x = b.to_compute("X")
    xr, xn, xb = b.tmp("xr"), b.tmp("xn"), b.tmp("xb")
    b(f"{xr} = Reshape ({x}, {b.ints('@group_shape')})")
    groups = b.ints("@groups")
    one, zero = b.tmp("one"), b.tmp("zero")
    b(f"{one} = ConstantOfShape <value = {b.ct}[1] {{1.0}}> ({groups})")
    b(f"{zero} = ConstantOfShape <value = {b.ct}[1] {{0.0}}> ({groups})")
    b(f"{xn} = InstanceNormalization <epsilon: float = @epsilon> ({xr}, {one}, {zero})")
    shape = b.tmp("shape")
    b(f"{shape} = Shape (X)")
    b(f"{xb} = Reshape ({xn}, {shape})")
    b.to_output(b.channel_affine(xb), "Y")
    return b.function(
        "GroupNorm",
        ["epsilon", "group_shape", "groups", "channel_shape"],
        ["X", "Scale", "B"],
        ["Y"],
    )


# Emits: GroupNormalization-21 (opset >= 21); function GroupNorm below
@register("groupnorm")
def lower_groupnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    scale, bias = affine_inputs(em, spec, ins)
    if em.opset >= STANDARD_OPSET:
        em.node(
            "GroupNormalization",
            [ins.x, scale, bias],
            outs[:1],
            name=node_name(spec, "GroupNormalization"),
            epsilon=spec.eps,
            num_groups=spec.num_groups,
            stash_type=1,
        )
        return
    fn = _function(em)
    em.call(
        fn,
        [ins.x, scale, bias],
        outs[:1],
        name=node_name(spec, fn.name),
        epsilon=spec.eps,
        group_shape=[0, spec.num_groups, -1],
        groups=[spec.num_groups],
        channel_shape=[spec.channels] + [1] * (spec.rank - 2),
    )
