# make bench -- the main job: benchmarks (GPU) or CPU timings + correctness table + kernel report (no GPU)
# make test  -- all tests that run on this machine (CPU: Triton interpreter, CUDA host emulation, static checks)
# Both bootstrap .venv (pinned versions from requirements.txt) and build the extensions first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
export PYTHONUNBUFFERED := 1

CSRC := $(shell find csrc -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' \) 2>/dev/null)

.PHONY: test test-slow fuzz bench build venv clean

venv: $(VENV)/.deps

$(VENV)/.deps: requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

# Editable install of the Python packages (no compile), once per venv.
$(VENV)/.installed: $(VENV)/.deps setup.py
	TILEFORMER_SKIP_CUDA_BUILD=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location\|BuildBackendWarning\|!!\|\*\*\*\|Please be careful\|name as your package\|with strategy\|^ *$$" || true
	touch $@

# transformer._C (nvcc) and transformer._C_emu (g++), built in place; ninja keeps build/ for incremental rebuilds.
$(VENV)/.built: $(VENV)/.installed setup.py $(CSRC)
	$(VPY) setup.py -q build_ext --inplace
	$(VPY) -c "import transformer"
	touch $@

build: $(VENV)/.built

# On a CPU machine the kernel backends must actually run (no silent skips): TILEFORMER_REQUIRE_BACKENDS.
# Two pytest workers (one per core of the CI machine), one test file per worker at a time.
test: build
	TILEFORMER_REQUIRE_BACKENDS=$${TILEFORMER_REQUIRE_BACKENDS-triton,cuda} $(VPY) -m pytest -q -n $${PYTEST_WORKERS-2} --dist loadfile

test-slow: build
	$(VPY) -m pytest -q -m slow

# Differential fuzz (tests/test_fuzz.py): N random valid configs from seed SEED (default: a fresh one, printed).
# Config i has seed SEED + i; `make fuzz SEED=<config seed> N=1` replays one config.
N ?= 500
fuzz: build
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "fuzz: seed $$seed, $(N) configs (config i has seed $$seed + i; replay one: make fuzz SEED=<seed + i> N=1)"; \
	TILEFORMER_FUZZ_SEED=$$seed TILEFORMER_FUZZ_N=$(N) \
	TILEFORMER_REQUIRE_BACKENDS=$${TILEFORMER_REQUIRE_BACKENDS-triton,cuda} \
	$(VPY) -m pytest -q -n $${PYTEST_WORKERS-2} tests/test_fuzz.py::test_fuzz -p no:cacheprovider; \
	rc=$$?; echo "fuzz: seed $$seed, $(N) configs"; exit $$rc

bench: build
	$(VPY) -m benchmarks.run

clean:
	rm -rf build *.egg-info transformer/*.so $(VENV)/.built $(VENV)/.installed
