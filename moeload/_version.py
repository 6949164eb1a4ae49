"""The package version, kept here only (pyproject reads it; modules import it from here)."""

__version__ = "0.1.0"
