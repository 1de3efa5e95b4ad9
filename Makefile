# Two set-up commands on a fresh machine (Python 3.11, a JDK 11/17 and Maven on PATH):
#   make demo   - venv, install, fetch jars, start local Kafka + Flink, train, submit, produce, show decisions
#   make test   - venv, install, fetch jars, run the whole suite (starts and stops its own services)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install down bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onramp demo

test: $(STAMP)
	$(VENV)/bin/onramp provision
	$(PY) -m pytest -q -rs --durations=15

bench: $(STAMP)
	$(VENV)/bin/onramp bench

down:
	test -x $(VENV)/bin/onramp && $(VENV)/bin/onramp down || true

clean: down
	rm -rf $(VENV) .onramp
