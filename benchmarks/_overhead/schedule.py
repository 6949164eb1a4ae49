"""The schedule of a run: untimed warm-up, then ABBA rounds of both arms in every mode, into `Progress`."""

from __future__ import annotations

import time

from .arms import ARMS


class Progress:
    """What the run has measured so far; filled in by `interleave`, read by the partial saves."""

    def __init__(self, modes: list[str]) -> None:
        self.times: dict = {m: {a: [] for a in ARMS} for m in modes}  # mode -> arm -> [steps] seconds
        self.compiled: dict = {m: set() for m in modes}  # mode -> steps in which a worker compiled or recompiled
        self.spent = dict.fromkeys(modes, 0.0)  # mode -> seconds in its measured steps
        self.stopped: dict[str, str] = {}  # mode -> why it stopped before --steps pairs
        self.phases: dict[str, float] = {}

    def pairs(self, mode: str) -> int:
        return min(len(t) for t in self.times[mode].values())


def _say_limits(mode: str, name: str, d: dict) -> None:
    for hit in d["limit_hits"]:
        print(f"!! [{mode}] the {name} arm: {hit} -- that frame runs eagerly from now on (this run will fail)", flush=True)


def interleave(arms: dict, modes: list[str], args, total: int, prog: Progress, tick, t_start: float) -> None:
    """Untimed warm-up steps [0, warmup) of every mode (in all arms at once with worker processes),
    then steps [warmup, total) in rounds of `args.block` steps: each mode, each arm, ABBA (the first
    arm and the first mode swap every round), into `prog`. A mode whose measured steps took
    `args.budget_s` stops at the end of a round, every mode once `args.deadline_s` have passed since
    `t_start`; `tick()` after each round (progress lines, partial saves)."""

    def past_deadline() -> bool:
        late = bool(args.deadline_s) and time.perf_counter() - t_start >= args.deadline_s
        for mode in modes:
            if late and mode not in prog.stopped:
                prog.stopped[mode] = (f"--deadline-s {args.deadline_s:g} reached after {prog.pairs(mode)} of "
                                      f"{args.steps} pairs")
                print(f"!! [{mode}] stopped: {prog.stopped[mode]}", flush=True)
        return late

    warm = list(range(args.warmup))
    parallel = args.mode != "eager"
    for mode in modes:
        print(f"[{mode}] warm-up: {len(warm)} steps per arm{' (they compile)' if mode == 'compiled' else ''}", flush=True)
        t0 = time.perf_counter()
        if parallel:
            for a in arms.values():
                a.send("run", mode, warm)
            done = [a.recv() for a in arms.values()]
        else:
            done = [a.run(mode, warm) for a in arms.values()]
        for name, d in zip(arms, done):
            prog.compiled[mode].update(d["compiled"])
            _say_limits(mode, name, d)
        dt = time.perf_counter() - t0
        prog.phases[f"warmup_{mode}_s"] = dt
        print(f"[{mode}] warm-up done in {dt:.0f} s", flush=True)
        if past_deadline():
            break
    for a in arms.values():
        a.mark("after_warmup")
    if len(prog.stopped) == len(modes):
        return
    t0 = time.perf_counter()
    for r, start in enumerate(range(args.warmup, total, args.block)):
        idxs = list(range(start, min(start + args.block, total)))
        for mode in modes if r % 2 == 0 else modes[::-1]:
            if mode in prog.stopped:
                continue
            if args.budget_s and prog.spent[mode] >= args.budget_s:
                prog.stopped[mode] = (f"--budget-s {args.budget_s:g} spent ({prog.spent[mode]:.0f} s) after "
                                      f"{prog.pairs(mode)} of {args.steps} pairs")
                print(f"!! [{mode}] stopped: {prog.stopped[mode]}", flush=True)
                continue
            t1 = time.perf_counter()
            for name in ARMS if r % 2 == 0 else ARMS[::-1]:  # ABBA: neither arm always runs first
                d = arms[name].run(mode, idxs)
                prog.times[mode][name] += d["times"]
                if d["compiled"]:
                    print(f"!! [{mode}] the {name} arm compiled or recompiled in measured step(s) {d['compiled']}: "
                          "the measured steps are not one compiled graph set (this run will fail)", flush=True)
                prog.compiled[mode].update(d["compiled"])
                _say_limits(mode, name, d)
            prog.spent[mode] += time.perf_counter() - t1
        prog.phases["measured_s"] = time.perf_counter() - t0
        tick()
        if past_deadline() or len(prog.stopped) == len(modes):
            break
