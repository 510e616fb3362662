# Two commands do everything on a fresh machine:
#   make run    build .venv (project + offline data packages), run the default recipe
#   make test   build .venv with the test extras too, run the whole test suite
# Set-up is a no-op when .venv is newer than pyproject.toml.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RECIPE ?= recipes/bert-sentiment.toml

.PHONY: setup setup-test run test bench tiny clean

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

tiny: setup-test  # the tiny model and data of recipes/tiny-llama-offline.toml
	$(PY) tests/tiny_models.py .tiny

clean:
	rm -rf $(VENV) .pytest_cache .tiny
