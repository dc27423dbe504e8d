"""normport layers: hand-written normalization layers with torch.nn's exact semantics.

Each layer is a drop-in twin of its torch.nn counterpart (same constructor, parameter and
buffer names, state_dict keys, training and eval behaviour), written in torch primitives on
one shared normalization primitive (:mod:`models._functional`) and one shared base for
running statistics (:mod:`models._base`).  On the CPU in float32 / float64, LayerNorm,
GroupNorm and BatchNorm's eval call ATen's fused kernels where those compute the same thing
(:mod:`models._fused`); the primitive stays their reference.

>>> import models
>>> net = models.zoo.get("cnn_bn").build(seed=0)  # the example networks, :mod:`models.zoo`
"""

from normport.models import table
from normport.models.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SequenceBatchNorm,
    TorchSequenceBatchNorm,
)
from normport.models.convert import convert
from normport.models.groupnorm import GroupNorm
from normport.models.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normport.models.layernorm import LayerNorm, RMSNorm
from normport.models.switchable import SwitchableNorm1d, SwitchableNorm2d

# isort: split
# Last: the zoo builds on the layers above (``models.zoo.sequence`` does ``import models``).
from normport.models import zoo

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SequenceBatchNorm",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "TorchSequenceBatchNorm",
    "convert",
    "table",
    "zoo",
]
