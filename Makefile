# The two Quick start commands: `make run` (set up + the whole DVC pipeline) and `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make run` installs what the pipeline and the service need; `make setup` (tests, CI) adds the extras.
RUN_STAMP := $(VENV)/.installed-run-stamp
STAMP := $(VENV)/.installed-stamp
# Commands that DVC stages run (`transfigure ...`) come from the virtual environment.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test lint lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[serve]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[serve,dev,openvino,ray]'
	touch $(RUN_STAMP) $(STAMP)

setup: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/transfigure repro
	@echo
	@echo "Done. Results:"
	@echo "  metrics/*.json        quality of each recipe (dvc metrics show)"
	@echo "  reports/<recipe>/     sample sheets (PNG)"
	@echo "  artifacts/<recipe>/   ONNX models for 'transfigure translate'"
	@echo "  runs/<recipe>/        resumable checkpoints"
	@echo "  mlflow.db             every run: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"
	@$(BIN)/dvc metrics show

test: setup
	$(BIN)/python -m pytest -q -n 3 --dist loadgroup --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The serving image's hashed lock files (Dockerfile), for the image's Python and platform, from requirements/*.in.
lock: setup
	cd requirements && for variant in gpu gpu-cu12 cpu; do \
		../$(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
			--custom-compile-command "make lock" serve-$$variant.in -o serve-$$variant.txt; \
	done

clean:
	rm -rf data/prepared runs artifacts metrics reports mlflow.db mlruns .dvc/cache .dvc/tmp
