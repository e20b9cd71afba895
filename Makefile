# Two commands on a fresh machine: `make train` (the demo pretraining run) and `make test`.
# Each creates .venv and installs the package (with torch from the registry) when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-all benchmark reproduce-small clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The default run: MAE on the embedded demo photos. Pass overrides with ARGS="key=value ...".
train: $(STAMP)
	$(PY) -m mim_lightning.train $(ARGS)

# The fast suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# The CPU benchmark table (docs/benchmarks.md) and the Fashion-MNIST evidence (docs/small_scale.md; needs
# apt-get install dataset-fashion-mnist).
benchmark: $(STAMP)
	$(PY) scripts/benchmark.py --suite --out docs $(ARGS)

reproduce-small: $(STAMP)
	$(PY) scripts/reproduce_small.py $(ARGS)

# Everything, including tests marked slow.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
