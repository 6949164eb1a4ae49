"""Step time of the embedded MoE workload with and without LoadTracer, measured in the same run.

Two identical models (same seed, same batches, same optimizer) are stepped alternately in blocks of
``--block`` steps, in ABBA order: one has a LoadTracer attached, the other has none. Every step is timed on its own
(``torch.cuda.synchronize`` before and after on CUDA, for both arms alike), so machine noise hits
both arms equally and the overhead is a mean of paired differences:

    overhead % = mean(t_traced - t_plain) / mean(t_plain) * 100, with a 95 % t-interval.

``--mode compiled`` (or ``--compile``) measures ``torch.compile``d models (whole model; the
backward and the optimizer step stay eager), ``--mode both`` eager and compiled in one run (each
round runs both modes, each mode its ABBA pair). Compiled arms live in two worker processes, one
per arm, so that each has its own dynamo cache: dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards``), and two instances of one model class compiled
in one process share compiled code, so whichever arm compiles first decides whether the other runs
the hooks (a traced arm compiled second records zeros). The traced arm's tracer is attached before
``torch.compile``. The ``--warmup`` steps, which compile, run in both workers at once and are not
timed; then the workers step in turn, one at a time, and time their own steps. In ``--mode both``
the eager arms are in the same workers (eager models never enter dynamo). ``--mode eager`` runs
both arms in this process, as before.

Each worker reports its dynamo statistics (graphs compiled, graph breaks and their reasons,
recompiles and their guard failures, before and after the warm-up). Each traced arm's counts are
checked exactly: every step, every traced layer, ``tokens = tokens per step`` and
``sum of counts = tokens x top_k``; a failed check is printed and the exit code is 1. The
tracer's flushes (every ``--flush-every`` steps) fall inside the timed steps. Writes
``tracer_overhead_<config>_<device>[_compiled|_both].json`` and ``.png`` to ``--out``.

Experts (``--experts``). ``loop``: the workload's `MoELayer` (per-expert chunks of data-dependent
size, one host sync per layer); under dynamo every new pattern of chunk sizes recompiles until
``recompile_limit`` (8) sends the layer back to eager, so a compiled run of it measures a mix.
``grouped``: `experiments/train_long.py`'s `GroupedMoE` (imported, not copied): an
``[E, capacity, H]`` dispatch buffer (capacity factor ``--capacity-factor``, default train_long's
1.25, overflow dropped; the trace's routed counts are unaffected) and two batched GEMMs, static
shapes, so dynamo compiles once; its router (with the tracer's hook) runs eagerly (train_long's
`route`), as in train_long's compiled runs. Default (``auto``): ``grouped`` for ``--mode compiled``
and for both modes of ``--mode both``, ``loop`` for ``--mode eager``. Any compile or recompile
during the measured steps, or any frame hitting the recompile limit, fails the run (JSON
``failed``, a banner on stdout, exit code 1).

Time. A progress line and the JSON so far (``"complete": false``) every ``--save-every`` seconds,
so a run killed from outside leaves what it measured; SIGTERM (``timeout``) writes it too.
``--budget-s`` caps each mode's measured seconds (a mode over it stops at the end of a round, the
others go on); ``--deadline-s`` stops every mode once that many seconds have passed since the start
(also right after a slow warm-up). Either way the tracers are then closed, the steps run are
checked, and the result says ``"complete": false`` with ``stopped`` per mode (exit code 3 if
nothing failed).

    python benchmarks/tracer_overhead.py --device cpu --config cpu-demo --steps 60
    python benchmarks/tracer_overhead.py --device cuda --config gpt3-small-moe --steps 300 --block 4 --warmup 10
    python benchmarks/tracer_overhead.py --device cuda --steps 400 --block 4 --warmup 10 --mode both --deadline-s 520

The code is in ``benchmarks/_overhead/`` (workload, timing, counts, dynamo_log, arms, schedule,
result, report, options, cli); this file is its entry point and re-exports its names.
"""


from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded from its path: _overhead
from _overhead.arms import ARMS, Arm, RemoteArm  # noqa: E402
from _overhead.cli import Interrupted, main  # noqa: E402
from _overhead.counts import check_counts  # noqa: E402
from _overhead.dynamo_log import DynamoLog  # noqa: E402
from _overhead.options import parse  # noqa: E402
from _overhead.report import figure, report  # noqa: E402
from _overhead.result import compose, exit_code, say_progress  # noqa: E402
from _overhead.schedule import Progress, interleave  # noqa: E402
from _overhead.timing import hook_cost, summarize, timed  # noqa: E402
from _overhead.workload import TRAIN_LONG, build, make_step, setup, train_long  # noqa: E402

__all__ = ["ARMS", "TRAIN_LONG", "Arm", "DynamoLog", "Interrupted", "Progress", "RemoteArm", "build", "check_counts",
           "compose", "exit_code", "figure", "hook_cost", "interleave", "main", "make_step", "parse", "report",
           "say_progress", "setup", "summarize", "timed", "train_long"]

if __name__ == "__main__":
    sys.exit(exit_code(main()))
