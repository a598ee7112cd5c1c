# The README's commands. Each runs `make setup` first, so it works on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flat-l2o-installed

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: setup
	$(PY) -m flat_l2o_plugin demo

test: setup
	$(PY) -m pytest -m "not slow"

test-all: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
