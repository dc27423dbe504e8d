"""The shared base that owns running statistics (batch, instance and switchable normalization).

Mirrors ``torch.nn.modules.batchnorm._NormBase`` so that parameter names, buffer names and
state_dict keys are identical and a state_dict loads both ways with ``strict=True``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from normport.models._affine import register_affine, reset_affine

__all__ = ["NormBase", "check_eps", "check_momentum", "check_positive_int", "with_defaults"]

_M = TypeVar("_M", bound=nn.Module)


def check_eps(eps: float) -> float:
    """``eps`` must be a finite number > 0 (it guards a square root of a variance)."""
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}: {eps!r}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum: float | None) -> float | None:
    """``momentum`` must be None (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
    return float(momentum)


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def with_defaults(**defaults: Any) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: the inherited ``__init__`` again, with some argument defaults replaced.

    The constructor keeps one definition (code, checks, signature) and a leaf states only the
    defaults that differ: torch.nn's instance norms take :class:`NormBase`'s arguments with
    ``affine=False, track_running_stats=False``.  ``inspect.signature`` and argument errors
    show the leaf's defaults and name, as if it had written the constructor out.
    """

    def decorate(cls: type[_M]) -> type[_M]:
        init = cls.__init__
        code, old = init.__code__, init.__defaults__ or ()
        names = code.co_varnames[code.co_argcount - len(old) : code.co_argcount]
        unknown = sorted(set(defaults) - set(names))
        if unknown:
            raise TypeError(f"{init.__qualname__}() has no defaulted argument(s) {unknown}")
        values = tuple(defaults.get(n, d) for n, d in zip(names, old, strict=True))
        # Same code and closure: super() inside still resolves from the defining class.
        new = types.FunctionType(code, init.__globals__, init.__name__, values, init.__closure__)
        new.__kwdefaults__ = init.__kwdefaults__
        new.__annotations__ = dict(init.__annotations__)
        new.__doc__ = init.__doc__
        new.__module__ = cls.__module__
        new.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = new
        return cls

    return decorate


class NormBase(nn.Module):
    """Affine parameters and running statistics per channel.

    State (names as in torch.nn): ``weight`` and ``bias`` of shape ``(C,)`` when ``affine``;
    ``running_mean``, ``running_var`` of shape ``(C,)`` and ``num_batches_tracked`` (int64
    scalar) when ``track_running_stats``.  Disabled state is registered as ``None``.

    Running-statistics update after a training batch with per-channel mean :math:`\\mu_B` and
    **biased** variance :math:`\\sigma^2_B` over :math:`n` values per channel:

    .. math::

        \\hat\\mu \\leftarrow (1 - m)\\,\\hat\\mu + m\\,\\mu_B, \\qquad
        \\hat\\sigma^2 \\leftarrow (1 - m)\\,\\hat\\sigma^2 + m\\,\\sigma^2_B \\frac{n}{n - 1}

    i.e. the output is normalized with the biased variance, while ``running_var`` accumulates
    the **unbiased** one.  ``m`` is ``momentum``; with ``momentum=None`` it is
    ``1 / num_batches_tracked`` (after incrementing), the cumulative moving average: after
    :math:`k` batches :math:`\\hat\\mu = \\frac{1}{k}\\sum_i \\mu_{B_i}`.  Note the direction:
    ONNX's BatchNormalization uses ``momentum_onnx = 1 - m``.
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, (num_features,), affine, **factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._register_extra(**factory)
        self.reset_parameters()

    def _register_extra(self, device: Any, dtype: Any) -> None:
        """Hook for a leaf's own parameters, registered after the shared state and before
        :meth:`reset_parameters` (Switchable Norm's mixture logits)."""

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "track_running_stats={track_running_stats}".format(**self.__dict__)
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        # Version 1 checkpoints (PyTorch < 0.4.1) have no num_batches_tracked.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None
                    and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    # -- input checks shared by the leaves ---------------------------------------------------

    def _check_channels(self, x: Tensor, dim: int) -> None:
        if x.shape[dim] != self.num_features:
            raise ValueError(
                f"expected input's size at dim={dim % x.dim()} to match num_features "
                f"({self.num_features}), but got: {x.shape[dim]}."
            )

    # -- running statistics ------------------------------------------------------------------

    def _uses_batch_stats(self) -> bool:
        """Batch statistics in training, and in eval when no running statistics are kept."""
        return self.training or self.running_mean is None

    def _update_factor(self) -> float | None:
        """Advance ``num_batches_tracked`` and return this step's factor ``m``, or None.

        None means "do not update" (eval, or ``track_running_stats=False``).
        """
        if not (self.training and self.track_running_stats):
            return None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: int, factor: float) -> None:
        """Blend a batch's mean and biased variance (shape ``(C,)``) into the running buffers."""
        unbiased = var * (n / (n - 1))
        for buf, stat in ((self.running_mean, mean), (self.running_var, unbiased)):
            new = stat.to(torch.promote_types(buf.dtype, stat.dtype)) * factor
            new.add_(buf, alpha=1.0 - factor)
            buf.copy_(new)

    def _running(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        return self.running_mean.view(shape), self.running_var.view(shape)
