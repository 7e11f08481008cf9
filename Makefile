# liverseg: `make demo` runs the main job end to end on synthetic data; `make test` lints and runs the tests.
# Both create .venv and install liverseg[cpu,dev,beam,export] on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[cpu,dev,beam,export]'
	touch $(STAMP)

# ruff (lint and format; its rules and the 120-character line in pyproject.toml), then the suite
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -n 2

# the edit loop: the suite without the tests marked slow (CI runs `make test`, all of it)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

demo: $(STAMP)
	$(BIN)/liverseg synth $(DEMO)/nifti --cases 16 --size 128 --slices 40..56 --seed 0
	$(BIN)/liverseg convert $(DEMO)/nifti $(DEMO)/records --val 0.19 --test 0.19 --overwrite
	$(BIN)/liverseg verify $(DEMO)/records
	$(BIN)/liverseg train --config configs/demo.yaml --records $(DEMO)/records --run $(DEMO)/run
	$(BIN)/liverseg evaluate --run $(DEMO)/run --split test
	@echo
	@echo "TensorBoard logs: $(DEMO)/run/train, $(DEMO)/run/validation, $(DEMO)/run/evaluation"
	@echo "Open them with:   $(BIN)/liverseg tensorboard $(DEMO)/run   then browse http://127.0.0.1:6006"

clean:
	rm -rf $(VENV) $(DEMO)
