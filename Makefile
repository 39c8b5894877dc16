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

# TorchRec (KeyedJaggedTensor/KeyedTensor for tierstore.client.modules and its tests): the CPU
# build of FBGEMM, then torchrec without its declared dependencies (they name the CUDA fbgemm-gpu
# and torchmetrics), then the pure-Python packages `import torchrec` needs.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) fbgemm-gpu-cpu==1.8.0
	$(PIP) --no-deps torchrec==1.8.0
	$(PIP) --no-deps tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.3 \
	    pyre-extensions==0.0.32 typing-inspect==0.9.0 mypy-extensions==1.2.0
	$(BIN)/python -c "from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor"
	touch $@

# FBGEMM's CPU TBE is the baseline the lookup/training benchmarks compare against.
$(BSTAMP): $(STAMP)
	$(PIP) fbgemm-gpu-cpu==1.8.0 || echo "fbgemm-gpu-cpu unavailable: benchmarks run without it"
	touch $@

# The main job: a private tierstored, DLRM + Shampoo on synthetic clicks for about two minutes
# with DRAM for 10% of the rows, checkpoints, evaluation; summary printed, files in tierstore-run/.
run: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/tierstore train --out-dir tierstore-run --checkpoint-every 1000 \
		--eval-every 1000

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

bench: $(BSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/run_all.py --trace $(TRACE) --out BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
