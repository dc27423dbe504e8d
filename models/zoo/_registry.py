"""The zoo's one registry: ``@register(...)`` on a factory adds a network."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from normport.models.zoo._spec import Interface, ZooSpec

__all__ = ["get", "names", "register"]

_REGISTRY: dict[str, ZooSpec] = {}

# A zero-argument module constructor: a function or a network class with all defaults.
Factory = TypeVar("Factory", bound=Callable[[], nn.Module])


def register(name: str, interface: Interface, *, description: str) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory`` under ``name``, fed and read as ``interface`` says."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"zoo network {name!r} is already registered")
        _REGISTRY[name] = ZooSpec(
            name=name,
            description=description,
            factory=factory,
            input_fn=interface.input_fn,
            input_names=interface.input_names,
            output_names=interface.output_names,
            dynamic_dims={k: dict(v) for k, v in interface.dynamic_dims.items()},
            dims=dict(interface.dims),
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
