# Two commands for a newcomer: `make demo` (set up + run the whole pipeline on the
# embedded synthetic dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DVC stage commands call `python`: the venv's, not whatever else is on PATH.
RUN := PATH="$(abspath $(BIN)):$$PATH"
STAMP := $(VENV)/.installed

.PHONY: demo test bench pretrain gpu-wheels lint status clean \
	report-check deploy-image deploy-pools deploy-deployments deploy-process-workers deploy-k8s-worker

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(RUN) dvc repro
	$(RUN) python -m flows.show_metrics

test: $(STAMP)
	$(BIN)/pytest -q

# Retrain the demo's pretrained detector (pretrained/detector_synthetic.pt) from its recipe:
# about an hour on 2 CPU cores, resumable; minutes on a GPU.
pretrain: $(STAMP)
	$(RUN) python -m flows.pretrain_detector --params configs/pretrain_synthetic.yaml

bench: $(STAMP)
	$(RUN) python -m bench.run_all

# What bench.gpu_check needs on a lent GPU machine that its image (Python 3.12, torch) lacks.
# pydensecrf2 (the demo's colour_crf refinement) has no binary wheel: built here by a
# local Python 3.12 (PY312=...), as the GPU machine may have no compiler.
PY312 ?= python3.12
gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11 defusedxml==0.7.1
	@$(PY312) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { \
		echo "gpu-wheels: PY312=$(PY312) is not a working Python 3.12 (pass PY312=/path/to/python3.12)"; \
		exit 1; }
	$(PY312) -m pip wheel -q --no-deps -w .whl pydensecrf2==1.1

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

status: $(STAMP)
	$(RUN) dvc status

# The HTML report rendered in headless Chromium: fails on an image that does not load or
# an empty table (apt-get install -y chromium).
report-check: $(STAMP)
	$(RUN) python -m bbam.report check reports/index.html

# Scale-out on a Prefect server (docs/scale_out.md): deploy/deploy.sh does each step.
# BBAM_IMAGE=registry/bbam:tag for the image and the deployments; PREFECT_API_URL for the rest.
deploy-image:
	deploy/deploy.sh image

deploy-pools: $(STAMP)
	$(RUN) deploy/deploy.sh pools

deploy-deployments: $(STAMP)
	$(RUN) deploy/deploy.sh deployments

deploy-process-workers: $(STAMP)
	$(RUN) deploy/deploy.sh process-workers

deploy-k8s-worker: $(STAMP)
	$(RUN) deploy/deploy.sh k8s-worker

clean:
	rm -rf runs metrics reports .prefect data/synthetic
