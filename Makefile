# tierstore: `make run` runs the main job, `make test` the tests, `make bench` the benchmarks.
# Each target installs what it needs into .venv first (offline-safe once the wheels are cached).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -q -c constraints.txt
STAMP   := $(VENV)/.installed
BSTAMP  := $(VENV)/.installed-bench
TRACE   ?= ../shared/data/real/dlrm-reuse-traces/reuse_medium_table_500K.txt

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

# FBGEMM's CPU TBE is the baseline the lookup/training benchmarks compare against.
$(BSTAMP): $(STAMP)
	$(PIP) fbgemm-gpu-cpu==1.8.0 || echo "fbgemm-gpu-cpu unavailable: benchmarks run without it"
	touch $@

run: $(STAMP)
	$(BIN)/tierstore demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

bench: $(BSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/run_all.py --trace $(TRACE) --out BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
