# liverseg: `make demo` runs the main job end to end on synthetic data; `make test` runs the tests.
# Both create .venv and install liverseg[cpu,dev] on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/liverseg synth $(DEMO)/nifti --cases 12 --size 128 --slices 48..64 --seed 0
	$(BIN)/liverseg convert $(DEMO)/nifti $(DEMO)/records --val 0.17 --test 0.25 --num-shards 2 --overwrite
	$(BIN)/liverseg verify $(DEMO)/records
	$(BIN)/liverseg inspect $(DEMO)/records --png $(DEMO)/overlays

clean:
	rm -rf $(VENV) $(DEMO)
