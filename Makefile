# Two commands do everything on a fresh Debian machine (as root):
#   make demo   set up, then train a CNN on Fashion-MNIST with CREST selection over gRPC on a local Ray and on
#               all the data, and print the comparison (crest bench train --demo, about 5 minutes on 2 cores)
#   make test   set up, then lint, type-check and run every test tier
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# OpenMP spin-waiting slows torch 10-70x next to other busy processes on small machines.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test lint setup dataset proto clean

demo: setup dataset
	$(BIN)/crest bench train --demo

test: setup dataset lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy selector_service trainer_client proto/generate.py

setup: $(VENV)/.installed

# torch==2.13.0 first: an unpinned resolve pulls a multi-GB CUDA build where the CPU wheel would do.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "installing python3-venv and python3-pip"; \
	  apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,dev,bench]'
	touch $@

dataset: $(DATA)

$(DATA):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

proto: setup
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
