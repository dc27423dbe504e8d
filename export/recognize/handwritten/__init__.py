"""Normalizations written out in tensor ops, found on the ATen graph by what they compute.

One module per family, each a ``pattern / check / rewrite`` rule with the matched subgraph
drawn in its docstring.  The ATen spellings they share (casts, ``rsqrt`` vs ``1 / sqrt``,
keepdim, biased variance) are in :mod:`._spellings`; the axes, per-channel operands, affine
tail and the rewrite in :mod:`._match`.

=====================  =============================================  ===========================
rule                   form                                           kind
=====================  =============================================  ===========================
:mod:`.frozen`         ``x * (w * rsqrt(rv + eps)) + (b - rm * s)``   batchnorm (running stats)
:mod:`.running`        ``(x - rm) / sqrt(rv + eps) * w + b``          batchnorm (running stats)
:mod:`.standardize`    ``(x - mean) / sqrt(var + eps) * w + b``,      layernorm, batchnorm (batch
                       ``(x - mean) / (std + eps) * w + b``           stats), sequence_batchnorm
:mod:`.rmsnorm`        ``w * x * rsqrt(mean(x ** 2) + eps)``          rmsnorm
=====================  =============================================  ===========================

They run in that order (``export.recognize.RULES``), after
:func:`export.recognize.functional.recognize_functional`: :mod:`.standardize` before
:mod:`.rmsnorm`, whose pattern ``d * rsqrt(mean(d ** 2) + eps)`` also holds for the centred
``d = x - mean`` inside a LayerNorm.
"""

from __future__ import annotations

from normport.export.recognize.handwritten.frozen import recognize_frozen
from normport.export.recognize.handwritten.rmsnorm import recognize_rmsnorm
from normport.export.recognize.handwritten.running import recognize_running
from normport.export.recognize.handwritten.standardize import recognize_standardize

__all__ = ["recognize_frozen", "recognize_rmsnorm", "recognize_running", "recognize_standardize"]
