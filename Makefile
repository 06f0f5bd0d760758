# Every target sets itself up: a .venv in the repo with torch and this package (editable) in it.
# TORCH_SPEC: the torch build to install first (the CPU-capable one on local disk here); on a GPU
# cluster use the build that matches your CUDA, e.g. make TORCH_SPEC="torch==2.14.1" test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job on its embedded default
	$(PY) launch/model_demo.py

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## every benchmark in bench/, results in bench/results.json
	$(PY) bench/model_step.py
	$(PY) bench/data_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
