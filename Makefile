# Two commands do everything on a fresh machine:
#   make run    build .venv (project + offline data packages), run the default recipe
#   make test   build .venv with the test extras too, run the whole test suite
# Set-up is a no-op when .venv is newer than pyproject.toml.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RECIPE ?= recipes/bert-sentiment.toml

AOT    := .venv-aot

.PHONY: setup setup-test run test bench structure tiny clean

setup: $(VENV)/.installed-run
setup-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[data]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: setup
	$(VENV)/bin/runner run $(RECIPE)

test: setup-test
	$(PY) -m pytest -q -n 2

bench: setup-test
	$(PY) bench/step.py

# The step's GPU program, compiled without a GPU (bench/structure.py): a venv of
# its own, as JAX's CUDA plugin (the jaxlib's version), cuDNN and the CUDA
# compiler's ptxas and libdevice would make every run in .venv look for a GPU.
$(AOT)/.installed: pyproject.toml
	$(PYTHON) -m venv $(AOT)
	$(AOT)/bin/python -m pip install --quiet --upgrade pip
	$(AOT)/bin/python -m pip install --quiet -e .
	version=$$($(AOT)/bin/python -c 'import jaxlib; print(jaxlib.__version__)') && \
	$(AOT)/bin/python -m pip install --quiet "jax-cuda12-plugin==$$version" \
		"jax-cuda12-pjrt==$$version" "nvidia-cudnn-cu12>=9.8,<10" "nvidia-cuda-nvcc-cu12>=12.8,<13"
	touch $@

structure: $(AOT)/.installed
	$(AOT)/bin/python bench/structure.py

tiny: setup-test  # the tiny model and data of recipes/tiny-llama-offline.toml
	$(PY) tests/tiny_models.py .tiny

clean:
	rm -rf $(VENV) $(AOT) .pytest_cache .tiny
