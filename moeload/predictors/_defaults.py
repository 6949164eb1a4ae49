"""Shipped default parameters of `mean_revert`, fit across runs (written by benchmarks/forecast_defaults.py --write)."""

MEAN_REVERT = {
    "aux": {"window": 100, "rho": 1.0, "shrink": 2.0, "block": 25, "target": "uniform"},
    "bias": {"window": 25, "rho": 0.9862327044933592, "shrink": 16.0, "block": 1, "target": "uniform"},
}
PROVENANCE = {
    "aux": "fit by benchmarks/forecast_defaults.py on gpt3-small-moe-s0, gpt3-small-moe-s1, gpt3-medium-moe-s0, gpt3-medium-moe-s1, demo: w=100, pull half-life none, shrink=2.0, block=25, target=uniform",
    "bias": "fit by benchmarks/forecast_defaults.py on gpt3-small-moe-bias-s0, gpt3-small-moe-bias-s1 (aux-loss-free, expert bias): w=25, pull half-life 50 steps, shrink=16.0, block=1, target=uniform",
}
