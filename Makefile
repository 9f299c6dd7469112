# Every target builds the environment first if it is missing (tools/setup_env.sh is idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-slow demo lint bench clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PYTEST) -m "not slow" tests

test-slow: setup
	$(PYTEST) -m slow tests

demo: setup
	$(PY) tools/demo.py

lint: setup
	$(VENV)/bin/ruff check d2_reclass tools tests benchmarks
	$(VENV)/bin/hadolint docker/Dockerfile

bench: setup
	$(PY) benchmarks/load_cost.py
	$(PY) benchmarks/coverage_matrix.py
	$(PY) benchmarks/map_vs_reinit.py
	$(PY) benchmarks/new_class_init.py
	$(PY) benchmarks/merge_ap.py
	$(PY) benchmarks/keep_old.py
	$(PY) benchmarks/maskdino_trainer.py
	$(PY) benchmarks/third_party.py

clean:
	rm -rf $(VENV) output data .pytest_cache
