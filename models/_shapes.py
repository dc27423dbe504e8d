"""Small shape helpers shared by the layers."""

from __future__ import annotations

from torch import Tensor

__all__ = ["channel_shape", "check_rank", "describe_ranks"]


def channel_shape(x: Tensor, channel_dim: int) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel ``(C,)`` vector against ``x`` at ``channel_dim``.

    ``(N, C, H, W)`` with ``channel_dim=1`` gives ``(C, 1, 1)``; ``(N, L, C)`` with -1 gives
    ``(C,)``.
    """
    dim = channel_dim % x.dim()
    return (x.shape[dim],) + (1,) * (x.dim() - dim - 1)


def describe_ranks(ranks: tuple[int, ...]) -> str:
    return " or ".join(f"{r}D" for r in ranks)


def check_rank(x: Tensor, ranks: tuple[int, ...]) -> None:
    """PyTorch's message: ``expected 4D input (got 3D input)``."""
    if x.dim() not in ranks:
        raise ValueError(f"expected {describe_ranks(ranks)} input (got {x.dim()}D input)")
