"""Shared CLI helpers: one-line user errors, trace opening, selections, output."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from moeload._balance import balance_stats, max_over_mean
from moeload.errors import InputError, MoeloadError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.core import Context
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.core import Context  # type: ignore[assignment]  # click's class of the same name
    from click.exceptions import UsageError  # type: ignore[assignment]  # click's class of the same name

EXIT_USER_ERROR = 2
_WARNINGS: list[str] = []  # one-line warnings of the running command

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
STEPS_OPTION = typer.Option(
    None,
    "--steps",
    metavar="START:STOP",
    help="Step-number range to use (stop exclusive), e.g. 1000:5000, :2000, 500:.",
)
SKIP_BAD_PARTS_OPTION = typer.Option(
    False,
    "--skip-bad-parts",
    help="Leave out unreadable or inconsistent parts (one warning lists them; their steps "
    "become gaps) instead of failing on them.",
)
LAYERS_OPTION = typer.Option(
    None,
    "--layers",
    metavar="LIST",
    help="Comma-separated layer indices or module paths, e.g. 0,3 or -1 (a negative index counts from the end, "
    "-1 is the last layer; default: all).",
)


def console() -> Console:
    """Stdout console (created per call so CliRunner's captured streams are used)."""
    return Console(file=sys.stdout, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print one error line to stderr and exit with code 2 (user error)."""
    typer.echo(f"moeload: error: {message}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


class FlagHelp:
    """Help that shows flags as flags: typer's rich help prints a value type beside every option,
    `<bool>` for `--json` or `--help` too, though a flag takes no value (its plain-text help
    already leaves it out). Mixed into the group and every command."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for p in self.get_params(ctx):  # type: ignore[attr-defined]
            if getattr(p, "is_flag", False) or getattr(p, "count", False):
                p.metavar = ""  # the rich help prints the metavar, when set, in place of the type
        super().format_help(ctx, formatter)  # type: ignore[misc]


class FlagHelpCommand(FlagHelp, TyperCommand):
    """A command whose help shows flags as flags (see FlagHelp)."""


class ErrorGroup(FlagHelp, TyperGroup):
    """Top-level group: a MoeloadError, a file error or a usage error becomes one stderr line and
    exit code 2.

    Anything else is a bug and keeps its traceback. Help shows flags as flags (FlagHelp).
    """

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            if not e.format_message().strip():  # no arguments at all: help was printed
                raise
            fail(_one_line(f"moeload: {e.format_message()} (see moeload --help)"))

    def invoke(self, ctx: Context) -> Any:
        import warnings

        _WARNINGS.clear()
        try:
            with warnings.catch_warnings(record=True) as caught:  # Python warnings become one-line notes
                out = super().invoke(ctx)
            dev = (DeprecationWarning, PendingDeprecationWarning)
            for w in caught:  # for developers: shown as Python shows them
                if issubclass(w.category, dev):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            notes = _WARNINGS + [
                _one_line(str(w.message)).removeprefix("moeload: ") for w in caught if not issubclass(w.category, dev)
            ]
            for note in dict.fromkeys(notes):  # printed after a successful command only: a failure is one line
                typer.echo(f"moeload: warning: {note}", err=True)
            return out
        except UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "moeload"
            fail(_one_line(f"{where}: {e.format_message()} (see {where} --help)"))
        except MoeloadError as e:
            fail(_one_line(str(e)))
        except OSError as e:
            where = e.filename if getattr(e, "filename", None) else ""
            msg = e.strerror or str(e)
            fail(_one_line(f"{where}: {msg}" if where else msg))


def refuse_output_inside(out: Path | None, trace_dir: Path, what: str = "--out") -> None:
    """InputError when `out` resolves (symlinks followed) to the input trace directory or inside it.

    Writing there would overwrite the manifest or a part, or leave stray files among the parts.
    """
    if out is None:
        return
    o, t = Path(out).resolve(), Path(trace_dir).resolve()
    if o == t or t in o.parents:
        raise InputError(
            f"{out}: {what} lies inside the input trace {trace_dir}; writing there would damage the "
            "trace; choose a path outside it"
        )


MAX_ALLOC_BYTES = 2 * 1024**3  # largest array a command may build from user-given sizes


def check_alloc(what: str, nbytes: int, formula: str) -> None:
    """InputError when an allocation sized by user input (estimated as `nbytes`) exceeds MAX_ALLOC_BYTES."""
    if nbytes > MAX_ALLOC_BYTES:
        raise InputError(
            f"{what}: would need about {human_bytes(nbytes)} ({formula}), more than the "
            f"{human_bytes(MAX_ALLOC_BYTES)} allowed; ask for less"
        )


def _one_line(s: str) -> str:
    return " ".join(s.split()) or "unknown error"


def open_trace_arg(path: Path, skip_bad_parts: bool = False):
    """Open a trace given on the command line (TraceFormatError names the path on failure).

    With skip_bad_parts, every part is checked now and the parts left out are reported as one
    `moeload: warning:` line on stderr when the command succeeds.
    """
    import warnings

    from moeload.trace import open_trace

    t = open_trace(path, skip_bad_parts=skip_bad_parts)
    if skip_bad_parts:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.bad_parts  # noqa: B018 - builds the step index, which checks every part
        _WARNINGS.extend(_one_line(str(w.message)) for w in caught)
    return t


def parse_steps(spec: str | None) -> tuple[int | None, int | None] | None:
    """'A:B' -> (A, B) step-number range, stop exclusive; ':B', 'A:' open-ended; 'N' -> (N, N+1)."""
    if spec is None or spec.strip() in ("", ":"):
        return None
    s = spec.strip()
    try:
        if ":" not in s:
            n = int(s)
            return (n, n + 1)
        a, b = s.split(":", 1)
        start = int(a) if a.strip() else None
        stop = int(b) if b.strip() else None
    except ValueError:
        raise InputError(f"--steps {spec!r}: expected START:STOP with integer step numbers, e.g. 100:2000") from None
    if start is not None and stop is not None and stop <= start:
        raise InputError(f"--steps {spec!r}: stop ({stop}) must be greater than start ({start})")
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise InputError(f"--steps {spec!r}: step numbers must be non-negative")
    return (start, stop)


def parse_layers(spec: str | None) -> list[int | str] | None:
    """'0,2,blocks.3.moe' -> [0, 2, 'blocks.3.moe']; None -> all layers."""
    if spec is None or not spec.strip():
        return None
    out: list[int | str] = []
    for x in spec.split(","):
        x = x.strip()
        if not x:
            raise InputError(f"--layers {spec!r}: empty item")
        out.append(int(x) if re.fullmatch(r"-?[0-9]+", x) else x)
    return out


def select_layers(trace, layers: str | Sequence[int | str] | None) -> np.ndarray:
    """Layer ids of a --layers selection (text, or ids/names a command already has; None: every layer),
    validated by the trace (one-line errors); a layer named twice (5 and -1 of six) is refused, since
    every whole-model number would count it twice."""
    wanted = parse_layers(layers) if layers is None or isinstance(layers, str) else list(layers)
    ids = trace.layer_ids(wanted)
    uniq, n = np.unique(ids, return_counts=True)
    if (n > 1).any():
        raise InputError(f"--layers {layers!r}: layer {int(uniq[n > 1][0])} is selected more than once")
    return ids


def load_window(trace, steps: str | None, layers: str | Sequence[int] | None, *, what: str = "proportions"):
    """-> (step numbers [S], layer ids [L], array [S, L, E]) for a step range and layer list (the
    --layers text, or layer ids a command already resolved).

    Raises InputError when the selection holds no recorded step.
    """
    sel = parse_steps(steps)
    lay_ids = select_layers(trace, layers)  # validates names/indices with a one-line error
    step_nums = trace.select_steps(sel)
    all_steps = trace.steps
    if len(step_nums) == 0:
        have = f"{all_steps[0]}..{all_steps[-1]}" if len(all_steps) else "none"
        raise InputError(f"{trace.path}: no recorded training steps in --steps {steps or 'all'} (recorded: {have})")
    arr_sel = sel if sel is not None else None
    if what == "counts":
        arr = trace.counts(arr_sel, list(lay_ids))
    else:
        arr = trace.proportions(arr_sel, list(lay_ids))
    return step_nums, lay_ids, arr


def to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, os.PathLike):
        return str(x)
    return x


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(to_jsonable(obj), indent=2))


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def human_bytes(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if f < 1024 or unit == "TiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{n} B"


PARAM_OPTION = typer.Option(
    None, "--param", "-p", metavar="KEY=VALUE", help="Hyperparameter, repeatable, e.g. -p window=200 -p alpha=0.1."
)


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """['window=100', 'alpha=0.5', 'robust=true'] -> {'window': 100, 'alpha': 0.5, 'robust': True}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise InputError(f"{flag} {item!r}: expected KEY=VALUE, e.g. window=100")
        out[key] = _value(raw.strip())
    return out


def _value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    if "," in raw:
        return tuple(_value(x.strip()) for x in raw.split(","))
    return raw


def layer_stats(c: np.ndarray, experts: list[int]) -> list[dict[str, Any]]:
    """Per-layer imbalance statistics of counts c: [S, L, E] (experts: [L] real experts per layer).

    imbalance_mean / imbalance_max: max/mean expert load per step, averaged / maximal over steps;
    imbalance_window: max/mean of the loads summed over the window; cv and min_max of those sums
    (all from `moeload._balance`, as the TensorBoard metrics and placement's imbalance).
    """
    out = []
    for li in range(c.shape[1]):
        x = c[:, li, : experts[li]].astype(np.float64)  # [S, E_l]
        tot = x.sum(0)
        ratio = max_over_mean(x)  # [S], NaN for steps without tokens (left out)
        ratio = ratio[~np.isnan(ratio)]
        window = balance_stats(tot)
        order = np.argsort(-tot, kind="stable")
        share = tot / tot.sum() if tot.sum() > 0 else np.full_like(tot, np.nan)
        out.append(
            {
                "assignments": int(tot.sum()),
                "imbalance_mean": float(ratio.mean()) if len(ratio) else float("nan"),
                "imbalance_max": float(ratio.max()) if len(ratio) else float("nan"),
                "imbalance_window": float(window["max_over_mean"]),
                "cv": float(window["cv"]),
                "min_max": float(window["min_over_max"]),
                "hottest": [[int(e), float(share[e])] for e in order[:3]],
                "coldest": [[int(e), float(share[e])] for e in order[::-1][:3]],
            }
        )
    return out


def progress_status(what: str):
    """A rich spinner on stderr while long work runs (silent when stderr is not a terminal)."""
    return Console(file=sys.stderr).status(what)
