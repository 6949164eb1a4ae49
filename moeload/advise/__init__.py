"""From load to seconds: a step-time model, balancing strategies replayed over a trace, advice.

`advise(trace, num_gpus=8)` -> `Advice` with `.table` (one row per strategy: predicted mean
step time of the MoE layers, saving vs `none` with an interval, experts and bytes moved, extra
memory), `.recommended` and `.reason`; `write_artifacts(advice, dir)` writes the files to act on
it. `Calibration.load("calib.json")` reads `moeload calibrate`'s output; without one, documented
H200 defaults are used and every output says "default". NumPy only (torch only in `calibrate`).
"""

from __future__ import annotations

from moeload.advise.advisor import Advice, advise, resolve_shape
from moeload.advise.artifacts import write_artifacts
from moeload.advise.cost import Calibration, ExpertShape, default_calibration
from moeload.advise.strategies import STRATEGIES, Setting, replay

__all__ = [
    "STRATEGIES",
    "Advice",
    "Calibration",
    "ExpertShape",
    "Setting",
    "advise",
    "default_calibration",
    "replay",
    "resolve_shape",
    "write_artifacts",
]
