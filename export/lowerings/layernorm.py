"""LayerNorm and RMSNorm over the trailing ``k`` axes.

- LayerNorm: ``LayerNormalization`` (``axis=-k``, ``stash_type=1``) from opset 17; below, the
  function ``normport.LayerNorm``, written as the textbook ReduceMean / Sub / Pow / ReduceMean /
  Add / Sqrt / Div / Mul / Add chain that onnxruntime re-fuses into its LayerNorm kernel.
  With eps outside the root (``eps_in_root=False``): ``normport.NormalizeStdPlusEps`` at
  every opset (:mod:`export.lowerings.eps_outside`).
- RMSNorm: ``RMSNormalization`` from opset 23; below, the function ``normport.RMSNorm``
  (Pow / ReduceMean / Add / Sqrt / Div / Mul, onnxruntime's SimplifiedLayerNorm pattern).
"""

from __future__ import annotations

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import affine_inputs, node_name, register
from normport.export.lowerings.eps_outside import lower_eps_outside

LAYERNORM_OPSET = 17
RMSNORM_OPSET = 23


def _trailing(spec: LayerSpec) -> list[int]:
    return list(range(-spec.normalized_ndim, 0))


def _function(em: Emitter, *, center: bool):
    b = em.body()
    x = b.to_compute("X")
    two = b.scalar(2.0)
    if center:
        mean, d = b.reduce_mean(x, "@axes"), b.tmp("d")
        b(f"{d} = Sub ({x}, {mean})")
    else:
        d = x
    p = b.tmp("p")
    b(f"{p} = Pow ({d}, {two})")
    var = b.reduce_mean(p, "@axes")
    eps = b.scalar_attr("epsilon")
    ve, std, xn, y = b.tmp("ve"), b.tmp("std"), b.tmp("xn"), b.tmp("y")
    b(f"{ve} = Add ({var}, {eps})")
    b(f"{std} = Sqrt ({ve})")
    b(f"{xn} = Div ({d}, {std})")
    b(f"{y} = Mul ({xn}, {b.to_compute('Scale')})")
    inputs = ["X", "Scale"]
    if center:
        yb = b.tmp("y")
        b(f"{yb} = Add ({y}, {b.to_compute('B')})")
        y = yb
        inputs.append("B")
    b.to_output(y, "Y")
    return b.function("LayerNorm" if center else "RMSNorm", ["axes", "epsilon"], inputs, ["Y"])


# Emits: LayerNormalization (opset >= 17); function LayerNorm below; function NormalizeStdPlusEps
# (eps outside the root)
@register("layernorm", eps_outside_root=True)
def lower_layernorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if not spec.eps_in_root:
        shape = list(spec.normalized_shape)
        lower_eps_outside(em, spec, ins, outs, axes=_trailing(spec), channel_shape=shape)
        return
    scale, bias = affine_inputs(em, spec, ins, tuple(spec.normalized_shape))
    if em.opset >= LAYERNORM_OPSET:  # B is optional here: no zeros for bias=False
        inputs = [ins.x, scale] + ([ins.bias] if ins.bias else [])
        em.node(
            "LayerNormalization",
            inputs,
            outs[:1],
            name=node_name(spec, "LayerNormalization"),
            axis=-spec.normalized_ndim,
            epsilon=spec.eps,
            stash_type=1,
        )
        return
    fn = _function(em, center=True)
    em.call(
        fn,
        [ins.x, scale, bias],
        outs[:1],
        name=node_name(spec, fn.name),
        axes=_trailing(spec),
        epsilon=spec.eps,
    )


# Emits: RMSNormalization (opset >= 23); function RMSNorm below
@register("rmsnorm")
def lower_rmsnorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    scale, _ = affine_inputs(em, spec, ins, tuple(spec.normalized_shape))
    eps = spec.eps  # eps=None was resolved at trace time to finfo(input dtype).eps
    if em.opset >= RMSNORM_OPSET:
        em.node(
            "RMSNormalization",
            [ins.x, scale],
            outs[:1],
            name=node_name(spec, "RMSNormalization"),
            axis=-spec.normalized_ndim,
            epsilon=eps,
            stash_type=1,
        )
        return
    fn = _function(em, center=False)
    em.call(
        fn,
        [ins.x, scale],
        outs[:1],
        name=node_name(spec, fn.name),
        axes=_trailing(spec),
        epsilon=eps,
    )
