"""`main`: the arms, in this process (eager) or one worker each, measured, checked, saved and reported."""

from __future__ import annotations

import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from .arms import ARMS, Arm, RemoteArm
from .options import parse
from .report import report
from .result import compose, save, say_progress
from .schedule import Progress, interleave
from .workload import setup


class Interrupted(Exception):
    pass


def _interrupt(signum, frame):  # SIGTERM (timeout, a scheduler) -> the partial result is written
    raise Interrupted(f"killed by signal {signum}")



def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    from moeload.errors import InputError

    try:
        cfg, device = setup(args)
    except InputError as e:  # one line, exit code 2 (as argparse)
        print(f"tracer_overhead: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    modes = ["eager", "compiled"] if args.mode == "both" else [args.mode]
    total = args.warmup + args.steps
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    stem = f"tracer_overhead_{cfg.name}_{args.device}" + ("" if args.mode == "eager" else f"_{args.mode}")
    json_path = out_dir / f"{stem}.json"
    print(f"config {cfg.name}, device {args.device} ({dev_name}), torch {torch.__version__}, mode {args.mode}, experts "
          f"{args.experts} (capacity factor {cfg.capacity_factor}), {args.steps} pairs per mode in blocks of {args.block}, "
          f"warm-up {args.warmup}, budget {args.budget_s or 'none'} s per mode, deadline {args.deadline_s or 'none'} s; "
          f"partial results in {json_path}", flush=True)
    prog = Progress(modes)
    t_start = time.perf_counter()
    last_save = [t_start]
    done, error = None, None

    def tick() -> None:
        if time.perf_counter() - last_save[0] >= args.save_every:
            last_save[0] = time.perf_counter()
            say_progress(prog, modes, args, t_start)
            save(json_path, compose(args, cfg, modes, prog, None, dev_name, last_save[0] - t_start, None))

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.mode == "eager":  # both arms in this process
                arms: dict = {name: Arm(name, args, cfg, device, modes, tmp) for name in ARMS}
                checksums = {name: a.checksum for name, a in arms.items()}
            else:  # one worker process per arm
                arms = {name: RemoteArm(name, argv, modes, tmp) for name in ARMS}
                checksums = {name: a.recv() for name, a in arms.items()}
            if len(set(checksums.values())) != 1:
                raise SystemExit(f"the arms' batches differ (token sums {checksums})")
            prog.phases["setup_s"] = time.perf_counter() - t_start
            interleave(arms, modes, args, total, prog, tick, t_start)
            wall = time.perf_counter() - t_start
            print(f"measured in {wall:.0f} s; closing the tracers, checking counts{', timing the hook' if 'eager' in modes else ''}",
                  flush=True)
            done = {name: a.finish() for name, a in arms.items()}
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        error = f"{type(e).__name__}: {e}"
        wall = time.perf_counter() - t_start
        save(json_path, compose(args, cfg, modes, prog, None, dev_name, wall, error))
        say_progress(prog, modes, args, t_start)
        raise SystemExit(f"stopped: {error}\n  what was measured: {json_path} (\"complete\": false)") from e
    finally:
        signal.signal(signal.SIGTERM, previous)

    result = compose(args, cfg, modes, prog, done, dev_name, wall, None)
    save(json_path, result)
    report(result, modes, args, cfg, total, out_dir, stem)
    return result
