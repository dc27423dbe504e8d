"""The example-network zoo: small networks built on normport layers, one per norm family.

>>> from models import zoo
>>> spec = zoo.get("cnn_bn")
>>> net = spec.build(seed=0)  # eval mode, random norm affines, warmed-up running stats
>>> logits = net(*spec.example_inputs(batch_size=2, height=32, width=32))

=================  ==========================  ============================================
name               normalization               input -> output
=================  ==========================  ============================================
``cnn_bn``         BatchNorm2d                 image (N, 3, H, W) -> logits (N, 10)
``cnn_gn``         GroupNorm                   image (N, 3, H, W) -> logits (N, 10)
``cnn_sn``         SwitchableNorm2d            image (N, 3, H, W) -> logits (N, 10)
``style_in``       InstanceNorm2d              image (N, 3, H, W) -> image_out (N, 3, H, W)
``transformer_ln`` LayerNorm                   tokens (N, L) -> logits (N, L, 64)
``llm_rms``        RMSNorm                     tokens (N, L) -> logits (N, L, 64)
``rnn_ln``         LayerNorm (every step)      sequence (N, L, 8) -> output (N, L, 4)
``seq_bn``         SequenceBatchNorm           sequence (N, L, 8) -> output (N, L, 4)
=================  ==========================  ============================================

A network is added in one place: a factory (or a network class) decorated with
``@register(name, interface, description=...)`` (:mod:`models.zoo._registry`) in
:mod:`models.zoo.vision` or :mod:`models.zoo.sequence`, where ``interface`` is the shared
:class:`~models.zoo._spec.Interface` of its family (inputs, outputs, dynamic dimensions).
"""

from normport.models.zoo import sequence, vision  # noqa: F401  (registers the networks)
from normport.models.zoo._registry import get, names
from normport.models.zoo._spec import ZooSpec

__all__ = ["ZooSpec", "get", "names"]
