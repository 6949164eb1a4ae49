"""Assertions shared by the CLI tests."""

from __future__ import annotations


def one_line_error(r, *needles: str) -> str:
    """Assert a CliRunner result failed the CLI way: exit code 2, exactly one stderr line starting
    "moeload: error: " and holding every needle, no traceback. Returns that line."""
    assert r.exit_code == 2, (r.output, r.exception)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeload: error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
