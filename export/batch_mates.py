"""Does a sample's eval output depend on its batch-mates?

Dynamic batching merges different clients' requests into one batch, so it is only safe for a
model whose every output for a sample is the same whatever else is in the batch.
:func:`measure` is the one probe: ``python -m export`` uses it to decide whether to write
``dynamic_batching``, and ``python -m runtime verify`` reports it.

What depends on batch-mates in eval: normalization with batch statistics
(``track_running_stats=False`` BatchNorm, ``F.batch_norm(..., training=True)``), anything that
reduces over axis 0 (``x - x.mean(0)``), attention or pooling across the batch.  What does not:
BatchNorm with running statistics, LayerNorm / GroupNorm / InstanceNorm / RMSNorm (statistics
per sample), attention within a sample.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from normport.export.outputs import named_leaves

__all__ = ["DEFAULT_THRESHOLD", "BatchMates", "measure", "reason", "relative_change"]

# float32 kernels give a sample alone and the same sample in a batch results that differ by a
# few ulps (other GEMM blockings, other reduction orders): ~1e-7 relative.  A batch statistic
# moves an output by orders of magnitude more than 1e-4.
DEFAULT_THRESHOLD = 1e-4


@dataclass(frozen=True)
class BatchMates:
    """Whether each eval output of a sample depends on the other samples of its batch.

    Attributes:
        outputs: output leaf name -> max over samples of ``max |y_i(batch) - y_i(alone)|``
            divided by ``max |y_i(alone)|`` (relative change when the batch-mates change).
        dependent: the leaves whose change is above ``threshold``.
        threshold: the relative change from which an output counts as batch-dependent.
        unbatched: leaves without a leading batch axis (cannot be split per request).
    """

    outputs: dict[str, float]
    dependent: tuple[str, ...]
    threshold: float
    unbatched: tuple[str, ...] = ()

    @property
    def independent(self) -> bool:
        return not self.dependent and not self.unbatched


def _input_names(module: nn.Module, count: int) -> list[str]:
    """forward's parameter names for the positional inputs, else ``input <i>``."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [f"input {names[i]!r}" if i < len(names) else f"input {i}" for i in range(count)]


def _check(module: nn.Module, batch: tuple, threshold: float) -> int:
    """The batch size B; ValueError/TypeError naming what is wrong."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    if training:
        raise ValueError(
            f"measure needs the module in eval mode (module.eval()); in training: "
            f"{', '.join(training[:5])}{' ...' if len(training) > 5 else ''}"
        )
    if not (isinstance(threshold, float | int) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    if not batch:
        raise ValueError("batch must hold at least one input tensor")
    names = _input_names(module, len(batch))
    sizes = set()
    for name, x in zip(names, batch, strict=True):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] < 2:
            shape = tuple(x.shape)
            raise ValueError(
                f"{name} must have a batch of at least 2 samples on axis 0, got shape {shape}"
            )
        sizes.add(x.shape[0])
    if len(sizes) > 1:
        shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip(names, batch, strict=True))
        raise ValueError(f"every input must have the same batch size on axis 0, got {shapes}")
    return sizes.pop()


def relative_change(together: torch.Tensor, alone: torch.Tensor) -> float:
    """``max |together - alone| / max(max |alone|, tiny)`` in float64.

    Equal values (also two infinities of one sign, or two NaNs) differ by 0; a NaN against a
    number, or infinities of opposite signs, differ by ``inf``.  ``max |alone|`` is taken over
    the finite values; ``tiny`` (float64's smallest normal) keeps an all-zero ``alone`` finite.
    """
    a, b = together.detach().double(), alone.detach().double()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=math.inf)
    finite = b[b.isfinite()].abs()
    scale = max(float(finite.max()) if finite.numel() else 0.0, torch.finfo(torch.float64).tiny)
    return float(diff.max()) / scale if diff.numel() else 0.0


@torch.no_grad()
def measure(
    module: nn.Module,
    batch: Sequence[torch.Tensor] | torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> BatchMates:
    r"""How much each eval output of a sample changes when it runs with its batch-mates.

    For a batch :math:`x_1, \dots, x_B` (every input's axis 0, :math:`B \ge 2`), with
    :math:`y(\cdot)` one output leaf (as :func:`export.outputs.named_leaves` names it), the
    model is run once on the whole batch and once per sample alone (batch of 1), and

    .. math::

        r = \max_{i=1}^{B} \frac{\max |y(x_{1..B})_i - y(x_i)_0|}
                               {\max(\max |y(x_i)_0|, \text{tiny})}

    is recorded.  A leaf is *dependent* when :math:`r >` ``threshold`` (it would change when
    dynamic batching put it beside other clients' requests), *unbatched* when its rank is 0 or
    its axis 0 is not :math:`B` in the batch run (or not 1 alone): it cannot be split per
    request.  A sample that cannot run alone (the model raises at batch 1, e.g. batch
    statistics of one value per channel) makes every batched leaf dependent with
    :math:`r = \infty`.

    Example: ``nn.BatchNorm2d(3, track_running_stats=False).eval()`` normalizes with the batch's
    statistics, :math:`r \approx 1`: dependent; the same layer with running statistics gives
    :math:`r \approx 10^{-8}` (kernel rounding only): independent.

    Args:
        module: in eval mode (every submodule), on the inputs' device.
        batch: the inputs (a tuple, or one tensor), each with the same batch size ``B >= 2``.
        threshold: relative change above which an output is dependent (default 1e-4: far above
            float32 rounding between batch sizes; use more for float16 / bfloat16 modules).

    Raises:
        ValueError: the module (or a submodule, named) is in training mode; an input (named)
            without a batch of at least 2 on axis 0, or batch sizes that differ; a bad
            threshold.
        TypeError: an input is not a tensor; an output leaf is not a tensor.
    """
    batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    size = _check(module, batch, threshold)
    together = named_leaves(module(*(x.clone() for x in batch)))  # in-place ops
    batched = {n: y for n, y in together.items() if y.dim() > 0 and y.shape[0] == size}
    unbatched = [n for n in together if n not in batched]
    change = dict.fromkeys(batched, 0.0)
    for i in range(size):
        try:
            alone = named_leaves(module(*(x[i : i + 1].clone() for x in batch)))
        except Exception:  # the model needs batch-mates to run at all
            change = dict.fromkeys(batched, math.inf)
            break
        for name, y in batched.items():
            single = alone.get(name)
            if single is None or single.dim() == 0 or single.shape[0] != 1:
                unbatched.append(name)
                continue
            if single.shape[1:] != y.shape[1:]:
                change[name] = math.inf  # a sample's shape depends on its batch-mates
                continue
            change[name] = max(change[name], relative_change(y[i], single[0]))
        batched = {n: y for n, y in batched.items() if n not in unbatched}
    outputs = {n: change[n] for n in together if n in batched}
    dependent = tuple(n for n, r in outputs.items() if r > threshold)
    return BatchMates(outputs, dependent, float(threshold), tuple(unbatched))


def _change(r: float) -> str:
    if math.isinf(r):
        return "cannot be computed for one sample alone (it needs batch-mates)"
    return f"changes by up to {r:.3g} of its size when its batch-mates change"


def reason(mates: BatchMates) -> str | None:
    """Why dynamic batching would change a sample's outputs, one line; None when it would not.

    For ``nn.BatchNorm1d(4, track_running_stats=False).eval()`` on a batch of 8::

        output 'output' changes by up to 0.952 of its size when its batch-mates change
        (relative change max|y(batch) - y(alone)| / max|y(alone)|, threshold 0.0001):
        dynamic batching would mix clients' requests
    """
    parts = [f"output {n!r} {_change(mates.outputs[n])}" for n in mates.dependent]
    if mates.unbatched:
        parts.append(
            f"output{'s' if len(mates.unbatched) > 1 else ''} "
            f"{', '.join(map(repr, mates.unbatched))} without a per-sample batch axis"
        )
    if not parts:
        return None
    return (
        "; ".join(parts) + " (relative change max|y(batch) - y(alone)| / max|y(alone)|, threshold "
        f"{mates.threshold:.3g}): dynamic batching would mix clients' requests"
    )
