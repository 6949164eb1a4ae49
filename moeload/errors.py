"""User-facing errors: one hierarchy, messages say what was wrong, where, and what to do."""

from __future__ import annotations


class MoeloadError(Exception):
    """Base class of every error moeload raises on purpose."""


class TraceFormatError(MoeloadError, ValueError):
    """A trace directory, manifest or part file is missing or malformed."""


class TraceMismatchError(MoeloadError, ValueError):
    """A writer was asked to append to a trace of a different model or shape."""


class InputError(MoeloadError, ValueError):
    """A file or argument given by the user cannot be used (CLI exit code 2)."""


class NotFittedError(MoeloadError, ValueError):
    """A predictor or detector was used before `fit`."""


class NoGatingModulesError(MoeloadError, ValueError):
    """A model has no MoE gating module that any adapter recognises."""
