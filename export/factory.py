"""The ``pkg.mod:factory`` protocol: how a user's own model reaches ``python -m export`` and
``python -m runtime verify`` (``--module pkg.mod:factory`` in both).

**Factory contract**: ``factory`` is an attribute of the importable module ``pkg.mod``, a
callable with no required arguments, returning either

* ``(module, example_inputs)``: an ``nn.Module`` and one batch, a tensor or a tuple of
  tensors, each with its batch axis first; or
* an ``nn.Module`` with an ``example_inputs(batch_size: int, seed: int)`` method returning
  such a batch (a tensor or a tuple of tensors).

>>> made = build("mypkg.nets:make_model")   # imports mypkg.nets, calls make_model() once
>>> made.module, made.example               # the module, and one batch (a tuple)
>>> made.sample(8, seed=1) if made.sample else None   # the method form draws other batches

Every failure is a :class:`FactoryError` (a ``ValueError``; :class:`FactoryTypeError` is also a
``TypeError``) whose message names the target and what was wrong: the target's form, the module
that does not import (and why), the missing attribute, a non-callable, an exception raised by
the factory, or a return value outside the contract.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["FactoryError", "FactoryTypeError", "Made", "as_inputs", "build", "load", "parse"]

Sampler = Callable[[int, int], tuple[Tensor, ...]]  # (batch_size, seed) -> one batch


class FactoryError(ValueError):
    """A ``pkg.mod:factory`` target that cannot be loaded, or a factory that broke the contract."""


class FactoryTypeError(FactoryError, TypeError):
    """The target, or what the factory returned, has the wrong type."""


@dataclass(frozen=True)
class Made:
    """What one call of a factory made.

    Attributes:
        target: ``"pkg.mod:factory"``.
        module: the module, in the mode the factory left it.
        example: one batch, a non-empty tuple of tensors: the factory's own, or (method form)
            ``module.example_inputs(batch_size, seed)`` with :func:`build`'s arguments.
        sample: the method form's ``(batch_size, seed) -> batch``, its results checked like
            ``example``; None for the ``(module, example_inputs)`` form.
    """

    target: str
    module: nn.Module = field(repr=False)
    example: tuple[Tensor, ...] = field(repr=False)
    sample: Sampler | None = field(default=None, repr=False)


def parse(target: str) -> tuple[str, str]:
    """``"pkg.mod:factory"`` -> ``("pkg.mod", "factory")``; FactoryError for any other form."""
    module_name, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not attr.isidentifier() or not all(map(str.isidentifier, module_name.split("."))):
        raise FactoryError(f"--module expects 'pkg.mod:factory', got {target!r}")
    return module_name, attr


def load(target: str) -> Callable[[], object]:
    """Import ``pkg.mod`` and return its callable ``factory`` (not called)."""
    module_name, attr = parse(target)
    try:
        imported = importlib.import_module(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None) or ""
        if isinstance(err, ModuleNotFoundError) and f"{module_name}.".startswith(f"{missing}."):
            raise FactoryError(f"--module {target!r}: {err}") from err  # names the module
        raise FactoryError(  # the module exists; something it imports does not
            f"--module {target!r}: importing {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    except Exception as err:  # the module's own code failed while importing
        raise FactoryError(
            f"--module {target!r}: importing {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    try:
        factory = getattr(imported, attr)
    except AttributeError:
        raise FactoryError(
            f"--module {target!r}: module {module_name!r} has no attribute {attr!r}"
        ) from None
    if not callable(factory):
        raise FactoryTypeError(
            f"--module {target!r}: {attr!r} is not callable (its type is {type(factory).__name__})"
        )
    return factory


def as_inputs(value: object, where: str) -> tuple[Tensor, ...]:
    """A tensor or a non-empty tuple/list of tensors, as a tuple; FactoryTypeError otherwise."""
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, tuple | list) and value and all(isinstance(t, Tensor) for t in value):
        return tuple(value)
    got = type(value).__name__
    if isinstance(value, tuple | list):
        got += f" of {', '.join(type(v).__name__ for v in value) or 'nothing'}"
    raise FactoryTypeError(f"{where}: expected a tensor or a tuple of tensors, got {got}")


def build(target: str, *, batch_size: int = 4, seed: int = 0) -> Made:
    """Load ``target``, call the factory once and check what it returned.

    ``batch_size`` and ``seed`` are passed to the method form's ``example_inputs`` for
    :attr:`Made.example`; the tuple form's batch is kept as given.
    """
    factory = load(target)
    try:
        made = factory()
    except Exception as err:
        raise FactoryError(
            f"--module {target!r}: the factory raised {type(err).__name__}: {err}"
        ) from err
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return Made(target, made[0], as_inputs(made[1], f"--module {target!r}: example_inputs"))
    if isinstance(made, nn.Module) and callable(getattr(made, "example_inputs", None)):
        method = made.example_inputs
        if "seed" not in inspect.signature(method).parameters:
            raise FactoryTypeError(
                f"--module {target!r}: example_inputs must accept (batch_size, seed)"
            )
        where = f"--module {target!r}: example_inputs(batch_size, seed)"

        def sample(batch_size: int, seed: int) -> tuple[Tensor, ...]:
            try:
                batch = method(batch_size, seed=seed)
            except Exception as err:
                raise FactoryError(f"{where} raised {type(err).__name__}: {err}") from err
            return as_inputs(batch, where)

        return Made(target, made, sample(batch_size, seed), sample)
    raise FactoryTypeError(
        f"--module {target!r}: the factory must return (module, example_inputs) or a module "
        f"with an example_inputs(batch_size, seed) method, got {_describe(made)}"
    )


def _describe(value: object) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    if isinstance(value, nn.Module):
        return f"{type(value).__name__} (an nn.Module without example_inputs)"
    return type(value).__name__
