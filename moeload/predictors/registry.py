"""Predictors found by name: `register` decorator, `get(name, **hyper)`, `available()`, and the one
parser of predictor specs (`from_spec`, `spec_label`) that backtests, `combo` and the online planner use."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def _pair(spec: Any) -> tuple[str, Mapping[str, Any]] | None:
    """(name, hyper) where `spec` is a 2-item tuple or list of a name and a mapping, else None."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return spec[0], spec[1]
    return None


def from_spec(spec: Any, what: str = "predictor") -> Predictor:
    """A new, unfitted predictor from a spec. Accepted specs:

    - a registered name: `"sw_avg"` (default hyperparameters);
    - a (name, hyperparameters) pair, tuple or list: `("sw_avg", {"window": 100})`;
    - a Predictor: a fresh one of its class with its `get_params()` (the instance is not changed).

    Anything else, an unknown name or bad hyperparameters -> InputError naming `what`.
    """
    if isinstance(spec, str):
        return get(spec)
    pair = _pair(spec)
    if pair is not None:
        return get(pair[0], **pair[1])
    if isinstance(spec, Predictor):
        return type(spec)(**spec.get_params())
    raise InputError(
        f"{what}: expected a predictor name, a (name, {{hyperparameters}}) pair or a Predictor, got {spec!r}; "
        f"names: {', '.join(available())}"
    )


def spec_label(spec: Any) -> str:
    """A short label of a spec: the name, `name(k=v, ...)` for a pair (keys sorted), else its repr."""
    if isinstance(spec, str):
        return spec
    pair = _pair(spec)
    if pair is not None:
        name, kw = pair
        return name + ("(" + ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) + ")" if kw else "")
    return repr(spec)
