# Every target sets itself up: a .venv in the repo with torch and this package (editable) in it.
# TORCH_SPEC: the torch build to install first (the CPU-capable one on local disk here); on a GPU
# cluster use the build that matches your CUDA, e.g. make TORCH_SPEC="torch==2.14.1" test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# DeepSpeed JIT-builds small ops (shm comm, CPU Adam) into TORCH_EXTENSIONS_DIR. One folder per
# venv: two checkouts sharing ~/.cache/torch_extensions rebuild each other's ops on every start.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo model-demo test test-fast gpu-check gpu-wheels lint format bench clean

$(STAMP): pyproject.toml setup.py coatnet_scale/data/_roi_jpeg.c
	@# libjpeg's headers for the region-of-interest decoder (setup.py; optional: Pillow otherwise)
	@test -f /usr/include/jpeglib.h || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] \
		|| apt-get install -y -q libjpeg62-turbo-dev >/dev/null || true
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

DEMO_RUN := runs/demo

demo: $(STAMP)  ## the main job: demo shards, then a 2-rank DeepSpeed ZeRO-2 pretraining on CPU
	$(PY) -m data_tools.make_demo --out data/demo
	rm -rf $(DEMO_RUN)
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 launch/pretrain.py \
		--model coatnet0 --config configs/demo.yaml train.run_dir=$(DEMO_RUN)
	$(PY) -m coatnet_scale.plots $(DEMO_RUN)

model-demo: $(STAMP)  ## the model family at a glance and one training step
	$(PY) launch/model_demo.py

test: $(STAMP)  ## the whole test suite (the 15 slowest listed at the end)
	$(PY) -m pytest --durations=15 tests

test-fast: $(STAMP)  ## the edit loop: single-process tests only (no ranks, no SLURM, nothing slow)
	$(PY) -m pytest -m "not distributed and not slurm and not slow" tests

gpu-check: $(STAMP)  ## on a machine with NVIDIA GPUs: every GPU-dependent check, one report
	$(PY) bench/gpu_check.py --out runs/gpu_check

# For a GPU machine without network whose python already has torch, timm and accelerate (such as
# a lent test machine, Python 3.12): the wheels of what it lacks, to carry there and install with
# `python3 -m pip install --no-index --find-links .gpu-wheels deepspeed webdataset braceexpand`.
GPU_WHEELS := .gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download --quiet --no-deps -d $(GPU_WHEELS) deepspeed==0.19.8
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(GPU_WHEELS) \
		$(GPU_WHEELS)/deepspeed-0.19.8.tar.gz
	rm $(GPU_WHEELS)/deepspeed-0.19.8.tar.gz
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d $(GPU_WHEELS) \
		hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
		typing-inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## every benchmark in bench/: bench/results.json and the table bench/results.md
	$(PY) bench/model_step.py
	$(PY) bench/data_pipeline.py
	$(PY) bench/data_order.py
	$(PY) bench/checkpoint_io.py
	$(PY) bench/activation_checkpointing.py
	$(PY) bench/zero_memory.py
	$(PY) bench/planner_accuracy.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
