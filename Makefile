# Two commands do everything: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test vllm-env test-vllm
VLLM_VENV ?= .venv-vllm
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/fgvr demo

test: setup
	$(BIN)/python -m pytest -q

# fgvr's served System 2 against a real vLLM (CPU build, its own ~3.5 GB environment; ~5 min on 2 cores)
vllm-env: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: scripts/vllm_cpu/setup.sh
	PYTHON=$(PYTHON) VLLM_VENV=$(VLLM_VENV) bash scripts/vllm_cpu/setup.sh
	touch $@

test-vllm: setup vllm-env
	FGVR_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q -m real_vllm tests/test_real_vllm.py
