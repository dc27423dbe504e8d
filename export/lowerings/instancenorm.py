"""InstanceNorm1d/2d/3d.

- batch statistics without tracking (the default): ``InstanceNormalization`` (all opsets).
- eval with tracked running statistics: ``BatchNormalization`` (per-channel running stats).
  Both are the form table's choices for either target (:mod:`export.lowerings._choices`).
- training with tracked statistics: the function ``normport.InstanceNormTrain`` (output and
  the running update from the batch average of per-instance statistics; torch.nn never
  advances ``num_batches_tracked`` here and treats ``momentum=None`` as 0).
"""

from __future__ import annotations

from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import Layout, affine_inputs, batch_normalization, op, register
from normport.export.lowerings._choices import Form, choose
from normport.export.lowerings.batchnorm import lower_batch_stats


# Emits: InstanceNormalization; BatchNormalization (eval, tracked); function InstanceNormTrain
@register("instancenorm")
def lower_instancenorm(em: Emitter, spec: LayerSpec, ins: Inputs, outs: list[str]) -> None:
    if spec.rank < 3 or not spec.batched:
        raise ValueError(
            f"cannot export {spec.path!r} ({spec.cls}) on a {spec.rank}D input: ONNX's "
            "instance normalization needs a batched (N, C, *) input; add the batch axis"
        )
    if spec.update_stats:
        layout = Layout.channels_first(spec, per_instance=True)
        lower_batch_stats(em, spec, ins, outs, layout, base="InstanceNorm")
    elif spec.batch_stats:
        choose(em, spec, (Form.OP,))
        scale, bias = affine_inputs(em, spec, ins)
        op(em, spec, "InstanceNormalization", [ins.x, scale, bias], outs, epsilon=spec.eps)
    else:
        choose(em, spec, (Form.OP,))
        batch_normalization(em, spec, ins, outs)
