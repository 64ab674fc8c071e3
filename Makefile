# One command each: install, demo, test, lint, format, bench.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases these machines carry as local wheels;
# on a GPU host pass the CUDA build you want, e.g. TORCH="torch==2.11.0 torchvision==0.26.0".
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/caption-worker demo

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/caption-worker bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
