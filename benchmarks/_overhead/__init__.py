"""The parts of benchmarks/tracer_overhead.py (the entry point; its docstring describes the method).

workload: the model, its step and the run's config; timing: timed steps, the hook's cost, the paired
summary; counts: the exact-count check of a trace; dynamo_log: dynamo's counters and recompiles; arms:
one arm in this process or in a worker; schedule: warm-up and the ABBA rounds; result: the JSON;
report: the figure and the printed summary; options: the command line; cli: `main`.
"""
