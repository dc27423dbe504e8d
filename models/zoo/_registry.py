"""The zoo's one registry: ``@register(...)`` on a factory adds a network."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normport.models.zoo._spec import InputFn, ZooSpec

__all__ = ["get", "names", "register"]

_REGISTRY: dict[str, ZooSpec] = {}


def register(
    name: str,
    *,
    description: str,
    input_fn: InputFn,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_dims: dict[str, dict[int, str]],
    dims: dict[str, int],
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: register ``factory`` (a zero-argument module constructor) under ``name``."""

    def decorate(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"zoo network {name!r} is already registered")
        _REGISTRY[name] = ZooSpec(
            name=name,
            description=description,
            factory=factory,
            input_fn=input_fn,
            input_names=input_names,
            output_names=output_names,
            dynamic_dims={k: dict(v) for k, v in dynamic_dims.items()},
            dims=dict(dims),
        )
        return factory

    return decorate


def names() -> list[str]:
    """The registered network names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> ZooSpec:
    """The spec registered under ``name``.

    Raises:
        KeyError: no such network (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown zoo network {name!r}; known: {', '.join(names())}") from None
