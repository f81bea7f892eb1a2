# bptt-mlip developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help install lint test docs-check run finetune-cpu data benchmark clean

help:
	@echo "make install   - create $(VENV) and install bptt-mlip with test extras"
	@echo "make lint      - install, then ruff (line length, errors) over the library, scripts and tests"
	@echo "make test      - install, lint, then run the test suite"
	@echo "make docs-check - check that every measured number in docs/ is in the run file it names"
	@echo "make run       - install, then run the main job (BPTT fine-tuning on the shipped Si-defect data, ~15 min on 2 CPU cores)"
	@echo "make data      - regenerate the shipped default datasets from their seeds"
	@echo "make clean     - remove build and run artefacts"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'

lint: install
	$(BIN)/python -m ruff check bptt_mlip experiments tests

test: lint
	$(BIN)/python -m pytest tests

docs-check:
	$(PYTHON) -m experiments.docs_check

run: install
	$(BIN)/python -m experiments.finetune --flagfile=experiments/si_cpu.flags --workdir=runs/si_cpu --overwrite

data: install
	$(BIN)/python -m experiments.make_dataset --kind=si_defects --out=bptt_mlip/data/default/si_defects
	$(BIN)/python -m experiments.make_dataset --kind=crystals --out=bptt_mlip/data/default/crystals

clean:
	rm -rf build *.egg-info .pytest_cache runs
