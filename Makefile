# The two commands: `make demo` and `make test`. Both set up .venv from this repo's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-oracles.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Pinned here (pyproject only declares compatible ranges): these wheels are on this disk.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test,ray,pandas]'
	$(BIN)/python -m pip install --quiet -r requirements-oracles.txt
	touch $(STAMP)

demo: setup
	$(BIN)/saliencycheck run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

# Benchmark against Quantus and bare compute (benchmarks/README.md); writes benchmarks/results.md.
.PHONY: bench
bench: setup
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/bench.py --workload all
