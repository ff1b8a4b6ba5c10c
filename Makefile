# Set-up is two commands: `make demo` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed JIT-compiles its C++ ops on first use; cache them inside the project.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast test-faults test-all install clean bench-gpu

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is in the same install as deepspeed (else pip pulls a CUDA torch).
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.lock -e '.[pipeline,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not faults"

# every fault-injection case (make test runs the faults_fast subset)
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

# everything that runs without a GPU: make test + the fault matrix + the extended tests
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

# every GPU benchmark of docs/performance.md in one call (run on the GPU machine; no venv there)
BENCH_OUT ?= runs/bench
bench-gpu:
	PYTHON=$(PYTHON) bash bench/gpu_all.sh $(BENCH_OUT)

demo: $(STAMP)
	$(BIN)/python -m unitoken.demo

clean:
	rm -rf .unitoken runs .pytest_cache
