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
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
