"""Predictors found by name: `register` decorator, `get(name, **hyper)`, `available()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from moeload.errors import InputError
from moeload.predictors.base import Predictor

_REGISTRY: dict[str, type[Predictor]] = {}
P = TypeVar("P", bound=type[Predictor])


def register(name: str) -> Callable[[P], P]:
    """Class decorator: make a Predictor subclass available as `get(name)`."""

    def deco(cls: P) -> P:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"predictor name {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Registered predictor names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **hyper: Any) -> Predictor:
    """A new, unfitted predictor `name` with keyword hyperparameters `hyper`."""
    if name not in _REGISTRY:
        raise InputError(f"predictor: unknown name {name!r}; available: {', '.join(available())}")
    cls = _REGISTRY[name]
    try:
        return cls(**hyper)
    except TypeError as exc:
        raise InputError(f"predictor {name!r}: bad hyperparameters {sorted(hyper)} ({exc})") from None
