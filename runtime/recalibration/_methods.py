"""How recalibration re-estimates running statistics: ``precise`` or ``ema``.

A normport training graph calls one function per stateful layer
(:class:`export.train_graph.TrainFunction`), and its name says which update rule the layer
exported with:

=====================================  ==========================================  ==============
call                                   update weight ``m_k`` at batch ``k``        counts batches
=====================================  ==========================================  ==============
``BatchNormTrain``                     ``momentum`` (call-site attribute)          yes
``BatchNormTrainCumulative``           ``1 / (num_batches_tracked + 1)``           yes
``SwitchableNormTrain[Cumulative]``    as BatchNorm (the batch branch)             yes
``InstanceNormTrain``                  ``momentum``                                no
``InstanceNormTrainFrozen``            0 (torch.nn's InstanceNorm, momentum=None)  no
=====================================  ==========================================  ==============

with ``r_k = (1 - m_k) r_{k-1} + m_k s_k``, ``s_k`` the batch's mean, or its *unbiased*
variance ``var_k n / (n - 1)`` (``n`` values per channel).

**ema** replays training's own rule over the ``K`` batches from ``r_0`` (exported, or reset to
mean 0 / variance 1).  With a constant momentum ``m``:

.. math::

    r_K = (1 - m)^K r_0 + \\sum_{k=1}^{K} m (1 - m)^{K - k} s_k

so the data carries ``1 - (1 - m)^K`` of the weight (47 % for m = 0.1, K = 6) and ``r_0`` the
rest: :func:`ema_reset_warning` says so when ``r_0`` is the reset values.

**precise** is the population estimate of Wu & Johnson, *Rethinking "Batch" in BatchNorm*
(2021), what ``torch.optim.swa_utils.update_bn`` computes (reset, ``momentum=None``, one pass):
every batch gets the same weight, whatever the exported momentum,

.. math::

    \\hat\\mu = \\frac{1}{K} \\sum_{k=1}^{K} \\mu_k, \\qquad
    \\hat\\sigma^2 = \\frac{1}{K} \\sum_{k=1}^{K} \\sigma^2_k \\frac{n_k}{n_k - 1}

and ``num_batches_tracked`` is reset to 0 and then counts the batches where the layer counts
(``K`` for BatchNorm and SwitchableNorm, 0 for InstanceNorm), as update_bn leaves it.  It is
run on :func:`export.train_graph.per_batch_form`: every stateful call is rewritten to its
momentum form with ``m = 1``, so each step's ``.next`` outputs are that batch's own ``s_k``,
and the mean over batches is taken here in float64.  One rewrite serves every layer
(InstanceNorm has no counting cumulative function to rewrite to) and nothing depends on the
exported statistics: ``(1 - 1) r = 0`` for any finite ``r``, and the run starts from the
reset values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from normport.export.train_graph import StatefulLayer

__all__ = ["METHODS", "ema_reset_warning", "precise_statistics"]

METHODS = ("precise", "ema")


def ema_reset_warning(layers: Sequence[StatefulLayer], batches: int) -> str | None:
    """What ``ema`` from reset statistics leaves of the reset values, per distinct momentum."""
    parts = []
    for momentum in sorted({la.momentum for la in layers if la.momentum is not None}):
        data = 1.0 - (1.0 - momentum) ** batches
        if data >= 0.995:
            continue
        frozen = " (InstanceNorm with momentum=None never moves)" if momentum == 0 else ""
        parts.append(
            f"momentum {momentum:g}{frozen} over {batches} batch(es): the statistics carry "
            f"{data:.0%} of the data's mean and {1 - data:.0%} of the reset values"
        )
    if not parts:
        return None
    return "; ".join(parts) + "; use --method precise (method='precise')"


def precise_statistics(
    layers: Sequence[StatefulLayer],
    sums: dict[str, np.ndarray],
    last: dict[str, np.ndarray],
    batches: int,
) -> dict[str, np.ndarray]:
    """Equal-weight means from float64 ``sums`` of per-batch statistics; counts from ``last``."""
    state = {}
    for layer in layers:
        mean, var, count = layer.state
        for name in (mean, var):
            state[name] = (sums[name] / batches).astype(last[name].dtype)
        state[count] = last[count]
    return state
