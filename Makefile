# The few commands people need. Everything installs into .venv/ at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TM := $(VENV)/bin/trainmedic
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench bench-watch clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

# Until the full demo lands: build three example runs and audit them (one healthy, two broken).
demo: setup
	$(PY) -m trainmedic.toy.examples demo-out/examples
	$(TM) check demo-out/examples/healthy-hf-run
	$(TM) check demo-out/examples/* --html demo-out/report.html --json demo-out/report.json; \
	  rc=$$?; test $$rc -eq 1 || { echo "expected the broken examples to fail the gate (exit 1), got $$rc"; exit 1; }
	@echo "report: demo-out/report.html"

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: setup
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run.py

bench-watch: setup
	$(PY) bench/watch_overhead.py

clean:
	rm -rf demo-out bench/.data .pytest_cache .mypy_cache .ruff_cache

# Fault injection, plain Trainer vs watch (a few minutes; rewrites the table in bench/README.md).
.PHONY: bench-faults
bench-faults: setup
	$(PY) bench/faults.py
