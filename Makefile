# Every target creates .venv on first use. CPU machines get PyTorch's CPU build by default;
# GPU users: `conda env create -f environment.yml` (or `pip install -e .[gpu]`) instead.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

NOTEBOOKS := $(wildcard notebooks/*.ipynb notebooks/solutions/*.ipynb)
# `pytest notebooks` collects the exercise solutions in notebooks/solutions/ too.
# The test suite runs on the tiny random checkpoint, offline, with two trials per experiment.
TEST_ENV := LLAMA_VISION_MODEL=tiny-random LLAMA_VISION_TRIALS=2 HF_HUB_OFFLINE=1 LLAMA_VISION_REQUIRE_BROWSER=1 \
	GRADIO_ANALYTICS_ENABLED=False
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg

.PHONY: setup browser test lab app inputs bench notebooks-clean notebooks-run clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,notebooks,app,serve]"
	touch $@

setup: $(STAMP)

# The app's browser test drives Debian's chromium (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "make test needs chromium for the app's browser test: sudo apt-get install chromium"; exit 1; }

test: setup browser
	$(TEST_ENV) $(PY) -m pytest tests notebooks $(NBVAL) $(PYTEST_ARGS)

# Strip model outputs, renumber cells, drop stray metadata.
notebooks-clean: setup
	$(PY) tools/nbtool.py clean $(NOTEBOOKS)

# Re-execute every notebook on tiny-random and save the checked outputs.
notebooks-run: setup
	$(TEST_ENV) $(PY) tools/nbtool.py run $(NOTEBOOKS)

# Jupyter refuses to run as root unless told to (containers, workshop machines)
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

# Served from the repository root (input/, README.md and docs/ in reach), with the first notebook open.
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. notebooks/00_architecture.ipynb $(LAB_ARGS)

app: setup
	$(PY) app.py $(APP_ARGS)

inputs: setup
	$(VENV)/bin/llama-vision inputs

bench: setup
	$(VENV)/bin/llama-vision bench --random-weights 11b

clean:
	rm -rf $(VENV) .pytest_cache results tests/artifacts
