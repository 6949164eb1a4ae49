"""Rolling-origin backtests of load predictors and their error metrics (docs/metrics.md).

`backtest(p, predictors=["sw_avg", ...], horizons=(1000, 2000))` -> tidy DataFrame;
`summarize(df)` -> mean per predictor x horizon x phase with ratios to sw_avg;
`format_table(df)` -> printable table; `error_metrics(f, y, experts, gpu_map)` for one forecast.
"""

from __future__ import annotations

from moeload.evaluation.backtest import backtest, format_table, summarize
from moeload.evaluation.forecast import TraceForecast, forecast_trace
from moeload.evaluation.metrics import METRICS, contiguous_map, error_metrics

__all__ = [
    "METRICS",
    "TraceForecast",
    "backtest",
    "contiguous_map",
    "error_metrics",
    "forecast_trace",
    "format_table",
    "summarize",
]
