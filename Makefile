# One command each: install, demo, test, lint, format, bench.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases these machines carry as local wheels;
# on a GPU host pass the CUDA build you want, e.g. TORCH="torch==2.11.0 torchvision==0.26.0".
TORCH ?= torch==2.14.1 torchvision==0.29.1

# The oldest transformers pyproject.toml accepts, which the GPU hosts carry: `make test-floor`
# runs the engine tests again with it laid over the venv's (its model code and cache API
# differ from later releases'). huggingface-hub 1.x, which 5.17 needs, speaks httpx.
FLOOR_TRANSFORMERS ?= transformers==5.17.0 huggingface-hub==1.33.0 httpx==0.28.1 httpcore==1.0.9
FLOOR_DIR := $(VENV)/floor
ENGINE_TESTS := tests/integration/test_engine.py tests/integration/test_slot_engine.py \
	tests/integration/test_weight_forms.py tests/integration/test_tiny_model.py

.PHONY: install demo test test-fast test-floor lint format bench clean

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

test-floor: install
	rm -rf $(FLOOR_DIR)
	$(BIN)/python -m pip install -q --no-deps --target $(FLOOR_DIR) $(FLOOR_TRANSFORMERS)
	PYTHONPATH=$(FLOOR_DIR) $(BIN)/python -c \
		"import transformers as t; print('transformers', t.__version__, t.__file__)"
	PYTHONPATH=$(FLOOR_DIR) $(BIN)/pytest -q $(ENGINE_TESTS)

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
