# StenCE platform. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; on a machine without it on disk add the CPU index, e.g.
#   make TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu demo
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
RUNS   ?= runs
export MLFLOW_DISABLE_TELEMETRY=true
export STENCE_SALT ?= demo-site-secret-change-me

.PHONY: install demo test test-fast test-cluster lint bench ui clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,cluster]'
	touch $@

install: $(VENV)/.installed

demo: install
	bash scripts/demo.sh

test: install
	bash cluster/ci_install.sh
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not cluster"

test-cluster: install
	bash cluster/ci_install.sh
	$(PY) -m pytest -q -m cluster

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: install
	$(PY) -m bench.run_all

ui: install
	$(VENV)/bin/stence ui

clean:
	rm -rf $(RUNS) .pytest_cache
