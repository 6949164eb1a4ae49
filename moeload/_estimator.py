"""The one estimator protocol of predictors and state detectors (scikit-learn `BaseEstimator`).

A subclass takes its hyperparameters as keyword-only `__init__` arguments and stores each, unchanged
and unchecked, in the attribute of the same name. `get_params` reads them back (so
`type(est)(**est.get_params())` is an equal, unfitted copy), `set_params` changes them, and the
`fit` (or `detect`) entry validates them; state computed there ends in `_`.
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from moeload.errors import InputError

E = TypeVar("E", bound="Estimator")


class Estimator:
    """get_params / set_params / repr from the keyword-only `__init__` signature."""

    @classmethod
    def _param_names(cls) -> list[str]:
        """The keyword-only parameters of `__init__`, in signature order."""
        sig = inspect.signature(cls.__init__)
        return [n for n, prm in sig.parameters.items() if prm.kind == prm.KEYWORD_ONLY]

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters as given to `__init__` (or `set_params`)."""
        return {n: getattr(self, n) for n in self._param_names()}

    def set_params(self: E, **params: Any) -> E:
        """Change hyperparameters (checked by the next `fit`/`detect`). Returns self.

        An unknown name -> InputError listing the valid ones; nothing is changed then."""
        names = self._param_names()
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise InputError(
                f"{type(self).__name__}: unknown hyperparameter {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(names) if names else '(none)'}"
            )
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
