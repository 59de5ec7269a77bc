# Two entry points (each sets itself up on a fresh machine):
#   make demo   - the main job on the embedded default: recipes/sft.py trains a small Llama-shaped model
#                 on packed samples with attn_implementation="flex", after checking it against eager
#   make test   - the CPU test suite (Triton kernels through Triton's interpreter)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: torch 2.13.0's CPU build (pip takes it from the local disk where it lies there)
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-gpu demo demo-kernel bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q -n 2 -m "not gpu" tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests

demo: setup
	$(PY) recipes/sft.py --check-parity --output-dir runs/demo

demo-kernel: setup
	$(PY) recipes/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
