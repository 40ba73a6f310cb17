# Fresh-machine entry points. Each target creates .venv if missing.
# torch==2.13.0 is installed explicitly FIRST: that CPU wheel is on local disk here, and
# any other version would pull a multi-GB CUDA build.
PY ?= python3
# pytest-xdist worker processes for `make test`: compiling dominates the suite and each
# worker compiles on its own core (CI: 2); worksteal: an idle worker takes queued tests from
# the busy one (the variant tests' compiles are long and uneven)
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin
export SMALLCHAINS_DATA ?= $(abspath ../shared/datasets)

.PHONY: venv demo test docs bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench,docs]"

demo: venv
	$(BIN)/python examples/matrix_exponential.py --quiet
	$(BIN)/python examples/lenet5_mnist.py --epochs 10
	$(BIN)/python examples/neural_ode_spiral.py

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# the documentation site (mkdocs.yml) into site/; --strict: a broken link, anchor or API
# reference fails the build
docs: venv
	$(BIN)/mkdocs build --strict

bench: venv
	$(BIN)/python bench/run_matexp.py
	$(BIN)/python bench/run_lenet5.py
	$(BIN)/python bench/run_neural_ode.py

clean:
	rm -rf $(VENV) *.egg-info site
