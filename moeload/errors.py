"""User-facing errors: one hierarchy, messages say what was wrong, where, and what to do."""

from __future__ import annotations

import re


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


def clip(x: object, n: int = 100) -> str:
    """`x` as one line of at most `n` characters (whitespace runs become one space; "..." where cut)."""
    s = " ".join(str(x).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def first_line(e: BaseException, limit: int = 200) -> str:
    """The gist of an error for a one-line message: its first line (the type's name if it has none),
    without a leading "[file:line] " tag (gloo's) or gloo's advice, at most `limit` characters."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else ""
    return (text.split(". This is typically")[0] or type(e).__name__)[:limit]
