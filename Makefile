# Two commands for a newcomer: `make demo` (set up + run the whole pipeline on the
# embedded synthetic dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DVC stage commands call `python`: the venv's, not whatever else is on PATH.
RUN := PATH="$(abspath $(BIN)):$$PATH"
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-wheels lint status clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(RUN) dvc repro
	$(RUN) python -m flows.show_metrics

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(RUN) python -m bench.run_all

# What bench.gpu_check needs on a lent GPU machine that its image (Python 3.12, torch) lacks.
gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11 defusedxml==0.7.1
	$(BIN)/pip download -q --no-deps --no-binary=:all: -d .whl pydensecrf2==1.1

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

status: $(STAMP)
	$(RUN) dvc status

clean:
	rm -rf runs metrics reports .prefect data/synthetic
