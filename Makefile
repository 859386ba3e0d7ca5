# Every target creates .venv on first use. CPU machines get PyTorch's CPU build by default;
# GPU users: `conda env create -f environment.yml` (or `pip install -e .[gpu]`) instead.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test lab app inputs bench notebooks-clean clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,notebooks,app]"
	touch $@

setup: $(STAMP)

test: setup
	LLAMA_VISION_MODEL=tiny-random $(PY) -m pytest $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

app: setup
	$(PY) app.py

inputs: setup
	$(VENV)/bin/llama-vision inputs

bench: setup
	$(VENV)/bin/llama-vision bench --random-weights 11b

clean:
	rm -rf $(VENV) .pytest_cache results tests/artifacts
