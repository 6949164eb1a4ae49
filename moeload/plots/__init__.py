"""Matplotlib figures of expert load, phases, forecasts, placements and backtests.

Each figure is `fn(data, ..., ax=None, **opts)` returning the Axes it drew on (`gpu_load`, which
has two panels, returns the Figure); none calls `show()`. Matplotlib is imported only when a figure
is drawn. Inputs longer than `MAX_POINTS` steps are averaged over bins of consecutive steps, and
the figure says so in the grey line under its title.
"""

from moeload.plots._common import MAX_POINTS
from moeload.plots.forecast import backtest_errors, forecast_vs_actual
from moeload.plots.load import fluctuation, load_heatmap, proportions_over_time, rolling_fluctuation
from moeload.plots.placement import gpu_load

__all__ = [
    "MAX_POINTS",
    "backtest_errors",
    "fluctuation",
    "forecast_vs_actual",
    "gpu_load",
    "load_heatmap",
    "proportions_over_time",
    "rolling_fluctuation",
]
