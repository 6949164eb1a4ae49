# The two Quickstart commands: `make demo` and `make test`. Both bootstrap .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

demo:
	bash scripts/bootstrap.sh
	$(PY) -m moeload demo

test:
	bash scripts/bootstrap.sh dev,deepspeed,hf,megatron,lightning
	$(VENV)/bin/ruff check moeload
	$(VENV)/bin/ruff format --check moeload
	$(VENV)/bin/mypy moeload
	bash scripts/torchtitan_site.sh
	$(PY) -m pytest -q --durations=15 --ignore=tests/tracing/test_torchtitan.py
	MOELOAD_REQUIRE_TORCHTITAN=1 PYTHONPATH=$(VENV)/torchtitan-site $(PY) -m pytest -q tests/tracing/test_torchtitan.py

clean:
	rm -rf $(VENV) runs .pytest_cache
