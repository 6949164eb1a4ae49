"""Case builders of the hostile-input CLI suite (tests/cli/test_hostile_suite.py).

A case is an id and a function `build(d, good) -> argv` that writes its inputs into the empty
directory `d` (copying the valid trace `good` where it needs one) and returns the arguments after
`moeload`. Every case is bad input: the command must refuse it
with exit code 2 and one stderr line, within the memory and time limits of the suite.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeload.trace import Manifest, TraceWriter

BIG = str(10**9)
HUGE = "9" * 30  # beyond int64
DIGITS_5000 = "9" * 5000
LAYERS = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
EXPERTS = 8


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path, Path], list[str]]
    xfail: str | None = None  # reason, where the case fails because of a known bug


def write_good_trace(path: Path, steps: int = 120) -> Path:
    """A real, valid trace: 3 layers x 8 experts, top-2, EP size 2, `steps` steps in two parts."""
    rng = np.random.default_rng(0)
    counts = rng.multinomial(512 * 2, np.full(EXPERTS, 1 / EXPERTS), size=(steps, len(LAYERS)))  # [S, L, E]
    m = Manifest(layers=LAYERS, experts_per_layer=EXPERTS, top_k=2, framework="synthetic", tokens_per_step=512,
                 world_size=2, ep_size=2)
    with TraceWriter(path, m) as w:
        w.write_block(np.arange(steps // 2), counts[: steps // 2])
        w.write_block(np.arange(steps // 2, steps), counts[steps // 2 :])
    return path


# ---- hostile traces: each mutates a copy of the good trace in place -----------------------------


def _manifest(t: Path) -> Path:
    return t / "manifest.json"


def _set_fields(**fields) -> Callable[[Path], None]:
    def mutate(t: Path) -> None:
        d = json.loads(_manifest(t).read_text())
        d.update(fields)
        _manifest(t).write_text(json.dumps(d))  # NaN is written as the JSON extension literal NaN
    return mutate


def _raw_field(field: str, text: str) -> Callable[[Path], None]:
    """Set `field` to the raw JSON text `text` (for values Python's json would not write)."""
    def mutate(t: Path) -> None:
        d = json.loads(_manifest(t).read_text())
        d[field] = "@@RAW@@"
        _manifest(t).write_text(json.dumps(d).replace('"@@RAW@@"', text))
    return mutate


def _fifo(t: Path) -> None:
    _manifest(t).unlink()
    os.mkfifo(_manifest(t))


def _dev_zero(t: Path) -> None:
    _manifest(t).unlink()
    _manifest(t).symlink_to("/dev/zero")


def _nested(t: Path) -> None:
    _manifest(t).write_text("[" * 100_000 + "]" * 100_000)


def _empty_dir(t: Path) -> None:
    shutil.rmtree(t)
    t.mkdir()


def _no_manifest(t: Path) -> None:
    _manifest(t).unlink()


def _parts(t: Path) -> list[Path]:
    return sorted((t / "parts").iterdir())


def _part_not_parquet(t: Path) -> None:
    _parts(t)[1].write_text("step,layer,expert,count\n0,0,0,1\n")


def _part_truncated(t: Path) -> None:
    p = _parts(t)[1]
    p.write_bytes(p.read_bytes()[:200])


def _part_uint64_beyond_int64(t: Path) -> None:
    """The second part's `routed` column recast to list<uint64> holding 2**64 - 1 (read as -1 by a cast)."""
    p = _parts(t)[1]
    tab = pq.read_table(p)
    n = tab.num_rows
    col = pa.array([[2**64 - 1] + [0] * (EXPERTS - 1)] * n, type=pa.list_(pa.uint64()))
    pq.write_table(tab.set_column(tab.schema.get_field_index("routed"), "routed", col), p)


def _trace_is_file(t: Path) -> None:
    shutil.rmtree(t)
    t.write_text("not a trace\n")


MANIFEST_HOSTILES: dict[str, Callable[[Path], None]] = {
    "manifest-fifo": _fifo,
    "manifest-dev-zero": _dev_zero,
    "manifest-nested-100k": _nested,
    "manifest-5000-digit-experts": _raw_field("experts_per_layer", DIGITS_5000),
    "manifest-5000-digit-schema": _raw_field("schema_version", DIGITS_5000),
    "layers-string": _set_fields(layers="abc"),
    "experts-8.9": _set_fields(experts_per_layer=8.9),
    "experts-NaN": _raw_field("experts_per_layer", "NaN"),
    "experts-minus-1": _set_fields(experts_per_layer=-1),
    "world-size-NaN": _raw_field("world_size", "NaN"),
    "schema-version-minus-1": _set_fields(schema_version=-1),
    "extra-list": _set_fields(extra=[1, 2]),
    "sessions-dict": _set_fields(sessions={"pid": 1}),
    "empty-dir": _empty_dir,
    "no-manifest": _no_manifest,
    "trace-is-a-file": _trace_is_file,
}
PART_HOSTILES: dict[str, Callable[[Path], None]] = {
    "part-not-parquet": _part_not_parquet,
    "part-truncated": _part_truncated,
    "part-uint64-beyond-int64": _part_uint64_beyond_int64,
}

# command -> argv given the trace and a scratch directory
TRACE_COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "info": lambda t, d: ["info", str(t)],
    "summary": lambda t, d: ["summary", str(t)],
    "states": lambda t, d: ["states", str(t)],
    "check": lambda t, d: ["check", str(t)],
    "predict": lambda t, d: ["predict", str(t)],
    "backtest": lambda t, d: ["backtest", str(t)],
    "plan": lambda t, d: ["plan", str(t)],
    "replay": lambda t, d: ["replay", str(t), "--gpus", "2"],
    "export": lambda t, d: ["export", str(t), str(d / "x.npy")],
    "plot": lambda t, d: ["plot", str(t), "-o", str(d / "figs")],
    "report": lambda t, d: ["report", str(t), "-o", str(d / "r.html")],
    "advise": lambda t, d: ["advise", str(t), "--gpus", "2"],
    "calibrate": lambda t, d: ["calibrate", "--trace", str(t), "--out", str(d / "c.json"), "--experts-per-gpu", "4",
                               "--hidden", "64", "--ffn-hidden", "128", "--device", "cpu", "--repeats", "1"],
}
# Every manifest hostile on the commands that read the manifest their own way or report on it;
# a core set on the others, which all open the trace through moeload.trace.open_trace.
FULL_MANIFEST_SET = ["info", "check", "advise", "calibrate"]
CORE_MANIFEST_SET = ["manifest-fifo", "manifest-dev-zero", "manifest-nested-100k", "manifest-5000-digit-experts",
                     "layers-string", "world-size-NaN", "empty-dir"]
READS_PARTS = [c for c in TRACE_COMMANDS if c != "calibrate"]  # calibrate reads only the manifest
# info reads no counts: a uint64 count beyond int64 is refused by `check` and every data command
READS_COUNTS = [c for c in READS_PARTS if c != "info"]


def _trace_case(cmd: str, mutate: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def build(d: Path, good: Path) -> list[str]:
        t = d / "run.moeload"
        shutil.copytree(good, t)
        mutate(t)
        return TRACE_COMMANDS[cmd](t, d)
    return build


def _option_case(*argv: str) -> Callable[[Path, Path], list[str]]:
    """`argv` with "{T}" for the good trace and "{D}" for the scratch directory."""
    def build(d: Path, good: Path) -> list[str]:
        return [a.replace("{T}", str(good)).replace("{D}", str(d)) for a in argv]
    return build


OPTION_CASES: dict[str, tuple[str, ...]] = {
    "predict-horizon-1e9": ("predict", "{T}", "--horizon", BIG),
    "predict-horizon-1e30": ("predict", "{T}", "--horizon", HUGE),
    "predict-at-1e30": ("predict", "{T}", "--at", HUGE),
    "predict-layers-1e30": ("predict", "{T}", "--layers", HUGE),
    "plan-replicas-1e9": ("plan", "{T}", "--replicas", BIG),
    "plan-gpus-1e9": ("plan", "{T}", "--gpus", BIG),
    "plan-gpus-1e9-replicas-1e9": ("plan", "{T}", "--gpus", BIG, "--replicas", BIG),
    "plan-balanced-replicas-1e5": ("plan", "{T}", "--policy", "balanced", "--gpus", "2", "--replicas", "100000"),
    "plan-horizon-1e9": ("plan", "{T}", "--horizon", BIG),
    "advise-gpus-1e9": ("advise", "{T}", "--gpus", BIG),
    "advise-replicas-1e9": ("advise", "{T}", "--gpus", "2", "--replicas", BIG),
    "advise-micro-batches-1e9": ("advise", "{T}", "--gpus", "2", "--micro-batches", BIG),
    "advise-copies-per-gpu-1e9": ("advise", "{T}", "--gpus", "2", "--copies-per-gpu", BIG),
    "advise-nodes-1e9": ("advise", "{T}", "--gpus", "2", "--nodes", BIG),
    "advise-gpus-1e30": ("advise", "{T}", "--gpus", HUGE),
    "backtest-horizons-1e9": ("backtest", "{T}", "--horizons", BIG),
    "backtest-horizons-1e30": ("backtest", "{T}", "--horizons", HUGE),
    "backtest-min-history-1e9": ("backtest", "{T}", "--min-history", BIG),
    "report-horizon-1e9": ("report", "{T}", "-o", "{D}/r.html", "--horizon", BIG),
    "plot-forecast-horizon-1e9": ("plot", "{T}", "forecast", "-o", "{D}/figs", "--horizon", BIG),
    "plot-gpu-load-steps-1e30": ("plot", "{T}", "gpu-load", "-o", "{D}/figs", "--steps", HUGE + ":"),
    "summary-steps-from-1e30": ("summary", "{T}", "--steps", HUGE + ":"),
    "summary-steps-negative-1e30": ("summary", "{T}", "--steps", "-" + HUGE + ":5"),
    "summary-steps-reversed": ("summary", "{T}", "--steps", "90:30"),
    "summary-steps-5000-digit": ("summary", "{T}", "--steps", "0:" + DIGITS_5000 + "x"),
    "states-steps-from-1e30": ("states", "{T}", "--steps", HUGE + ":"),
    "export-steps-from-1e30": ("export", "{T}", "{D}/x.csv", "--steps", HUGE + ":"),
    "export-layers-1e30": ("export", "{T}", "{D}/x.csv", "--layers", HUGE),
    "report-steps-reversed": ("report", "{T}", "-o", "{D}/r.html", "--steps", "90:30"),
    "calibrate-experts-per-gpu-1e9": ("calibrate", "--out", "{D}/c.json", "--experts-per-gpu", BIG, "--device", "cpu",
                                      "--repeats", "1"),
    "calibrate-hidden-1e9": ("calibrate", "--out", "{D}/c.json", "--experts-per-gpu", "1", "--hidden", BIG,
                             "--ffn-hidden", BIG, "--device", "cpu", "--repeats", "1"),
    "demo-flush-every-1e9": ("demo", "--out", "{D}/demo.moeload", "--flush-every", BIG, "--no-progress"),
    "demo-threads-1e9": ("demo", "--out", "{D}/demo.moeload", "--threads", BIG, "--no-progress"),
    "demo-config-unknown": ("demo", "--out", "{D}/demo.moeload", "--config", "no-such-config", "--no-progress"),
}


# ---- hostile importer inputs ------------------------------------------------------------------


def _write(name: str, data: bytes | str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / "src" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p
    return make


def _npy_header_only(shape: tuple[int, ...], dtype: str = "<i8") -> bytes:
    """An .npy file whose header claims `shape` but which holds only 64 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def _npz_claiming(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("counts.npy", _npy_header_only(shape))
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


CSV_HEAD = "step,layer,expert,count\n"
TPE_LINE = '{"iter": 10, "layer": 0, "tpe": [[3, 1]]}\n'
ROUTER_LINE = '{"step": 0, "layer": 0, "rank": 0, "num_tokens": 1, "topk": 1, "top_indices": [[1]]}\n'
_EE = "tokens_per_expert/"

# id -> (format, source builder, extra options); dest is always a fresh path
IMPORT_CASES: dict[str, tuple[str, Callable[[Path], Path], tuple[str, ...]]] = {
    # rank 131071 and expert 65535 are each under their limit; dense [S, R, L, E] would be 64 GiB
    "csv-rank-131071-expert-65535": ("csv", _write("a.csv", "step,layer,expert,count,rank\n0,0,65535,5,131071\n"),
                                     ("--top-k", "1")),
    "csv-expert-1e12": ("csv", _write("a.csv", CSV_HEAD + "0,0,1000000000000,5\n"), ("--top-k", "1")),
    "csv-step-1e30": ("csv", _write("a.csv", CSV_HEAD + HUGE + ",0,0,5\n"), ("--top-k", "1")),
    "csv-count-5000-digit": ("csv", _write("a.csv", CSV_HEAD + "0,0,0," + DIGITS_5000 + "\n"), ("--top-k", "1")),
    "csv-num-experts-1e10": ("csv", _write("a.csv", CSV_HEAD + "0,0,0,5\n"), ("--top-k", "1", "--num-experts",
                                                                             str(10**10))),
    "csv-top-k-1e30": ("csv", _write("a.csv", CSV_HEAD + "0,0,0,5\n"), ("--top-k", HUGE)),
    "csv-invalid-utf8": ("csv", _write("a.csv", CSV_HEAD.encode() + b"0,0,0,5\n\xff\xfe,\x80,0,1\n"), ("--top-k", "1")),
    "csv-gzip-no-suffix": ("csv", _write("a.csv", gzip.compress((CSV_HEAD + "0,0,0,5\n").encode())), ("--top-k", "1")),
    "npy-header-1e11-elements": ("numpy", _write("a.npy", _npy_header_only((100_000, 1_000, 1_000))), ("--top-k", "1")),
    "npy-header-2e63-elements": ("numpy", _write("a.npy", _npy_header_only((2**31, 2**31, 2))), ("--top-k", "1")),
    "npz-member-1e11-elements": ("numpy", _write("a.npz", _npz_claiming((100_000, 1_000, 1_000))), ("--top-k", "1")),
    "npy-object-pickle": ("numpy", _write("a.npy", _npy(np.array([[[{"a": 1}]]], dtype=object))), ("--top-k", "1")),
    "npy-not-npy": ("numpy", _write("a.npy", b"\x93NUMPY garbage" * 10), ("--top-k", "1")),
    "npy-first-step-1e30": ("numpy", _write("a.npy", _npy(np.ones((2, 1, 4), np.int64))), ("--top-k", "1",
                                                                                           "--first-step", HUGE)),
    "tpe-invalid-utf8": ("megatron-tpe", lambda d: _write(_EE + "rank0.jsonl", b'{"iter": 1, "layer": 0, "tpe": '
                                                                             b'[[1, 2]], "x": "\xff\xfe"}\n')(d).parent,
                         ("--top-k", "1")),
    "tpe-gzip-no-suffix": ("megatron-tpe", lambda d: _write(_EE + "rank0.jsonl", gzip.compress(TPE_LINE.encode()))(
        d).parent, ("--top-k", "1")),
    "tpe-rank-99999999999": ("megatron-tpe", lambda d: _write(_EE + "rank99999999999.jsonl", TPE_LINE)(d).parent,
                             ("--top-k", "1")),
    "tpe-iter-1e23": ("megatron-tpe", lambda d: _write(_EE + "rank0.jsonl", TPE_LINE.replace("10", "1" + "0" * 23))(
        d).parent, ("--top-k", "1")),
    "tpe-nested-100k": ("megatron-tpe", lambda d: _write(_EE + "rank0.jsonl", '{"iter": 1, "layer": 0, "tpe": '
                                                                             + "[" * 100_000 + "]" * 100_000 + "}\n")(
        d).parent, ("--top-k", "1")),
    "tpe-ep-size-1e9": ("megatron-tpe", lambda d: _write(_EE + "rank0.jsonl", TPE_LINE)(d).parent,
                        ("--top-k", "1", "--ep-size", BIG)),
    "router-invalid-utf8": ("megatron-router-trace", lambda d: _write("router_trace_rank0.jsonl",
                                                                      ROUTER_LINE.encode()[:-2] + b', "x": "\xff"}\n')(
        d).parent, ()),
    "router-gzip-no-suffix": ("megatron-router-trace", lambda d: _write("router_trace_rank0.jsonl",
                                                                        gzip.compress(ROUTER_LINE.encode()))(d).parent,
                              ()),
    "router-rank-99999999999": ("megatron-router-trace", lambda d: _write("router_trace_rank99999999999.jsonl",
                                                                          ROUTER_LINE)(d).parent, ()),
    "router-expert-1e12": ("megatron-router-trace", lambda d: _write("router_trace_rank0.jsonl", ROUTER_LINE.replace(
        "[[1]]", "[[1000000000000]]"))(d).parent, ()),
    "router-num-experts-1e10": ("megatron-router-trace", lambda d: _write("router_trace_rank0.jsonl", ROUTER_LINE)(
        d).parent, ("--num-experts", str(10**10))),
    "router-num-tokens-5000-digit": ("megatron-router-trace", lambda d: _write("router_trace_rank0.jsonl",
                                                                               ROUTER_LINE.replace(
                                                                                   '"num_tokens": 1',
                                                                                   '"num_tokens": ' + DIGITS_5000))(
        d).parent, ()),
    "sglang-empty-pt": ("sglang", lambda d: _write("expert_distribution_recorder_1.pt", b"")(d).parent, ("--top-k", "1")),
    **{f"sglang-garbage-pt-{seed}": ("sglang", lambda d, seed=seed: _write(
        "expert_distribution_recorder_1.pt", random.Random(seed).randbytes(4096))(d).parent, ("--top-k", "1"))
       for seed in range(4)},  # fixed seeds: random bytes make torch's unpickler fail in different ways
    "unknown-format": ("no-such-format", _write("a.csv", CSV_HEAD + "0,0,0,5\n"), ()),
}


def _import_case(fmt: str, make: Callable[[Path], Path], opts: tuple[str, ...]) -> Callable[[Path, Path], list[str]]:
    def build(d: Path, good: Path) -> list[str]:
        return ["import", fmt, str(make(d)), str(d / "out.moeload"), *opts]
    return build


def _heads_case(data: Callable[[], bytes], *opts: str) -> Callable[[Path, Path], list[str]]:
    """`moeload heads` on a budgets file written by `data()` (it reads no trace)."""
    def build(d: Path, good: Path) -> list[str]:
        f = d / "budgets.npy"
        f.write_bytes(data())
        return ["heads", str(f), *opts]
    return build


def _good_budgets() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).lognormal(0, 1, size=(2, 8)) * 1000)
    return buf.getvalue()


HEADS_CASES: dict[str, Callable[[Path, Path], list[str]]] = {
    "heads-claims-1e12-heads": _heads_case(lambda: _npy_header_only((1, 10**12), "<f8")),
    "heads-claims-1e9-layers": _heads_case(lambda: _npy_header_only((10**9, 8), "<f8")),
    "heads-claims-3d": _heads_case(lambda: _npy_header_only((2, 2, 2), "<f8")),
    "heads-object-dtype": _heads_case(lambda: _npy_header_only((2, 8), "|O")),
    "heads-text-file": _heads_case(lambda: b"not numpy at all"),
    "heads-requests-1e9": _heads_case(_good_budgets, "--requests", BIG),
    "heads-tp-1e9": _heads_case(_good_budgets, "--tp", BIG),
    "heads-copies-1e9": _heads_case(_good_budgets, "--copies-per-rank", BIG),
}


def control_cases() -> list[Case]:
    """Each trace command on an unchanged copy of the good trace: these must succeed (exit code 0), so
    that the hostile cases fail because of their input, not because of the limits or the arguments."""
    return [Case(f"control:{cmd}", _trace_case(cmd, lambda t: None)) for cmd in TRACE_COMMANDS]


def all_cases(xfails: dict[str, str]) -> list[Case]:
    """Every case of the suite; `xfails`: case id -> reason of a known bug."""
    cases: list[Case] = []
    for cmd in TRACE_COMMANDS:
        for name, mutate in MANIFEST_HOSTILES.items():
            if cmd in FULL_MANIFEST_SET or name in CORE_MANIFEST_SET:
                cases.append(Case(f"{cmd}:{name}", _trace_case(cmd, mutate)))
    for cmd in READS_PARTS:
        for name, mutate in PART_HOSTILES.items():
            if cmd in READS_COUNTS or name != "part-uint64-beyond-int64":
                cases.append(Case(f"{cmd}:{name}", _trace_case(cmd, mutate)))
    for name, argv in OPTION_CASES.items():
        cases.append(Case(f"option:{name}", _option_case(*argv)))
    for name, (fmt, make, opts) in IMPORT_CASES.items():
        cases.append(Case(f"import:{name}", _import_case(fmt, make, opts)))
    for name, build in HEADS_CASES.items():
        cases.append(Case(f"option:{name}", build))
    return [Case(c.id, c.build, xfails.get(c.id)) for c in cases]
