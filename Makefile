# Two commands do everything on a fresh Debian machine (as root):
#   make demo   set up, then train a CNN on Fashion-MNIST with CREST selection over gRPC on a local Ray and on
#               all the data, and print the comparison (crest bench train --demo, about 3 minutes on 2 cores)
#   make test   set up, then lint, type-check and run every test tier, the Docker deploy tier included (it installs
#               and starts a Docker engine: tests/test_deploy_engine.py)
# Also: make test-deploy (the deploy tier alone), make wheel (dist/crest_selection-*.whl, to install by side).
# make docs: the documentation site (mkdocs.yml) into build/site, strict: a broken link or reference fails it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# OpenMP spin-waiting slows torch 10-70x next to other busy processes on small machines.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test test-deploy lint docs setup dataset engine wheel proto clean

demo: setup dataset
	$(BIN)/crest bench train --demo

test: setup dataset engine lint docs
	$(BIN)/python -m pytest

# The deploy tier alone: a real engine builds the images and runs the CPU compose stack (deploy/README.md).
test-deploy: setup dataset engine
	$(BIN)/python -m pytest -m deploy

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy selector_service trainer_client proto/generate.py proto/crest/cli.py

# The reference and results pages are generated during the build (docs/_gen/). The two variables silence banners
# that mkdocs-material and a plugin print about MkDocs 2.0, which are not warnings about this site.
docs: setup
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict

setup: $(VENV)/.installed

# torch==2.13.0 first: an unpinned resolve pulls a multi-GB CUDA build where the CPU wheel would do.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "installing python3-venv and python3-pip"; \
	  apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[trainer,cpu,dev,bench,hf,lightning]'
	touch $@

dataset: $(DATA)

# The Docker engine and debootstrap (the deploy tier bootstraps its base image from Debian's packages); the test
# starts dockerd when none runs, and stops it after.
engine:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { \
	  echo "installing docker.io and debootstrap"; \
	  apt-get update -qq && apt-get install -y -qq docker.io debootstrap; }

# The project's wheel, for installing one side elsewhere: pip install 'dist/crest_selection-0.1.0-py3-none-any.whl[trainer]'
wheel: setup
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

$(DATA):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

proto: setup
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
