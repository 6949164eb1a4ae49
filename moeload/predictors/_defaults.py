"""Shipped default parameters of `mean_revert`, fit across runs (written by benchmarks/forecast_defaults.py --write).

Placeholder until the fit is run: window mean with no pull (the flat SW_Avg).
"""

MEAN_REVERT = {
    "aux": {"window": 100, "rho": 1.0, "shrink": 0.0, "target": "uniform"},
    "bias": {"window": 100, "rho": 1.0, "shrink": 0.0, "target": "uniform"},
}
PROVENANCE = {"aux": "placeholder, not fitted", "bias": "placeholder, not fitted"}
