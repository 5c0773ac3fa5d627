# The few commands people need. Everything installs into .venv/ at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TM := $(VENV)/bin/trainmedic
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench bench-watch clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

# watch, heal and check together on the toy model: faults caught while training, a heal round,
# the verdicts and one HTML report (demo-out/report.html).
demo: setup
	$(TM) demo --out demo-out

# One worker per core (pytest-xdist), each test file on one worker so its module fixtures run once.
test: setup browser
	$(PY) -m pytest -q -n auto --dist loadfile

# Chromium for the HTML report's browser test (tests/report/test_browser.py), where it can be had:
# Debian/Ubuntu as root. Otherwise a note, and that test skips itself. Never fails the setup.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser test (apt-get)"; \
	    { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && \
	        apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } || \
	      echo "note: could not install chromium; the browser test will be skipped"; \
	  else \
	    echo "note: chromium is not installed (Debian: sudo apt-get install chromium); the browser test will be skipped"; \
	  fi; }

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

# heal's divergence barriers compared on the toy base (a few minutes; rewrites its table in bench/README.md).
.PHONY: bench-heal
bench-heal: setup
	$(PY) bench/heal.py
