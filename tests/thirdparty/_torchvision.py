"""Import torchvision's pure-Python model definitions beside the CPU build of torch.

torchvision 0.28 (the release for torch 2.13) ships compiled ops built for CUDA; they do not
load beside the local CPU torch, and ``import torchvision`` then fails in
``_meta_registrations`` with "operator torchvision::nms does not exist", because it registers a
fake kernel for ``nms`` / ``qnms`` unconditionally.  Defining those two schemas first lets the
import finish; the compiled ops stay unavailable (``torchvision.extension._has_ops()`` is
False), which the model definitions used here (resnet, mobilenet, convnext, swin) never need.
Import this module before ``torchvision`` (and before ``timm``, which imports it).
"""

from __future__ import annotations

import torch

__all__ = ["torchvision"]


def _define_missing_schemas() -> None:
    if hasattr(torch.ops.torchvision, "nms"):
        return  # a working torchvision build (or an earlier import) defined them
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(lib)  # a Library unregisters its definitions when collected


_LIBRARIES: list[torch.library.Library] = []
_define_missing_schemas()

import torchvision  # noqa: E402
