"""The `moeload` command line: a typer app, one module per command group.

`main()` is the console-script entry point (pyproject: moeload = "moeload.cli:main").
User errors (moeload.errors.MoeloadError, file errors) print one line and exit with code 2.
"""

from __future__ import annotations

import typer
from typer.core import TyperCommand

from moeload.cli._common import ErrorGroup, FlagHelpCommand

app = typer.Typer(
    name="moeload",
    cls=ErrorGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from moeload._version import __version__

        typer.echo(f"moeload {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Record, understand, forecast and balance Mixture-of-Experts expert load.

    Example: moeload summary runs/exp1.moeload
    """


def _register() -> None:
    import importlib

    from moeload.cli import advise, check, export, figures, forecast, heads, importing, info

    info.register(app)
    advise.register(app)
    check.register(app)
    forecast.register(app)
    export.register(app)
    figures.register(app)
    importing.register(app)
    heads.register(app)
    try:
        demo = importlib.import_module("moeload.cli.demo")
    except ModuleNotFoundError as e:
        if e.name != "moeload.cli.demo":
            raise
    else:
        demo.register(app)
    for command in app.registered_commands:  # every plain command's help shows flags as flags
        if command.cls in (None, TyperCommand):
            command.cls = FlagHelpCommand


_register()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="moeload")


__all__ = ["app", "main"]
