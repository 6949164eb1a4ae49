"""Every command's --help shows flags as flags (issue 13): no `<bool>` or other value type beside an
option that takes no value, while options that take one keep their type or metavar."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from moeload.cli import app

runner = CliRunner()
ROOT = typer.main.get_command(app)
COMMANDS = [None, *ROOT.list_commands(typer.Context(ROOT))]  # None: `moeload --help` itself


def help_rows(args: list[str]) -> tuple[str, list[str]]:
    r = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    return r.output, r.output.splitlines()


def row_of(lines: list[str], opt: str) -> str:
    """The options-panel row of `opt` (its help text follows on the same line at this width)."""
    found = [x for x in lines if re.match(rf"^│\s+(\*\s+)?{re.escape(opt)}[\s,]", x)]
    assert len(found) == 1, (opt, found)
    return found[0]


def value_part(row: str, param) -> str:
    """The text of `row` between the option's names and its help text (where a type would be)."""
    rest = row.strip("│ ").removeprefix("*").strip()
    for name in [*param.opts, *param.secondary_opts]:
        rest = re.sub(rf"(^|[\s,]){re.escape(name)}(?=[\s,]|$)", " ", rest, count=1)
    help_start = (param.help or "").split()[0] if param.help else None
    return rest.split(help_start, 1)[0].strip(" ,") if help_start and help_start in rest else rest.strip()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "moeload")
def test_flags_show_no_value_type_and_valued_options_keep_theirs(command):
    args = [] if command is None else [command]
    out, lines = help_rows(args)
    assert "<bool>" not in out and "[BOOL]" not in out and "BOOLEAN" not in out
    cmd = ROOT if command is None else ROOT.get_command(typer.Context(ROOT), command)
    ctx = typer.Context(cmd, info_name=command or "moeload", parent=typer.Context(ROOT))
    options = [p for p in cmd.get_params(ctx) if isinstance(p, typer.core.TyperOption) and not p.hidden]
    flags = [p for p in options if p.is_flag or p.count]
    assert any(p.opts == ["--help"] for p in flags)
    for p in options:
        long = next(o for o in p.opts if o.startswith("--"))
        shown = value_part(row_of(lines, long), p)
        if p in flags:
            assert shown == "", (command, long, shown)
        else:
            assert shown and not shown.startswith("<bool"), (command, long, shown)  # a type or metavar remains


def test_every_subcommand_was_checked_and_flags_still_parse(tmp_path):
    assert {"info", "check", "import", "predict", "backtest", "advise"} <= set(COMMANDS)
    r = runner.invoke(app, ["import", "--keep-empty-layers", "sglang", str(tmp_path / "nope"), str(tmp_path / "t")])
    assert r.exit_code == 2 and "nope: no such file or directory" in r.stderr
    r = runner.invoke(app, ["check", "--json=yes", str(tmp_path)])
    assert r.exit_code == 2 and "does not take a value" in r.stderr
