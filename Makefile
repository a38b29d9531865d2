# Two commands for a newcomer: `make demo` (set up + run the whole pipeline on the
# embedded synthetic dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DVC stage commands call `python`: the venv's, not whatever else is on PATH.
RUN := PATH="$(abspath $(BIN)):$$PATH"
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint status clean

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
	$(RUN) python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

status: $(STAMP)
	$(RUN) dvc status

clean:
	rm -rf runs metrics reports .prefect data/synthetic
