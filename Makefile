# fastproxy: `make run` brings the system up on this machine; `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-pure bench faults lint clean ebpf compiled instructions memory ratios

# The venv is (re)installed whenever the project's own dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

$(VENV): $(STAMP)

# The hot modules compiled by Cython from their own .py (+ .pxd); FASTPROXY_PURE=1 runs the .py.
compiled: $(VENV)
	$(PY) scripts/build_compiled.py

run: $(VENV) compiled
	$(VENV)/bin/fastproxy dev $(RUN_ARGS)

# When root, prepare eBPF first (apt packages, header links, tracefs); never fatal by itself.
ebpf:
	@if [ "$$(id -u)" = 0 ]; then ./scripts/prepare-ebpf.sh; else echo "not root: eBPF tests will skip"; fi

# pytest exits 5 when it collected nothing: that is a failure here, as any non-zero exit is.
# The whole suite runs in the compiled form; then the tests of the data path run again in the pure
# form (FASTPROXY_PURE=1), so the fallback stays a working, tested one. `make test-pure` runs all
# of it pure (what `make test` would take twice as long to do). The bad-input flood scenarios
# (tests/faults/test_bad_input.py, ~35 s) run compiled only: each bad request of theirs is also
# in test_router_http.py, which runs in both forms.
PURE_TESTS ?= tests/unit tests/integration/test_router_http.py tests/integration/test_sidecar.py \
	bench/bench_exchange.py tests/integration/test_websocket.py \
	tests/integration/test_llm_routing.py tests/integration/test_upstream_pool.py
test: $(VENV) compiled ebpf
	FASTPROXY_EXPECT_FORM=compiled $(PY) -m pytest tests bench --benchmark-disable -q $(TEST_ARGS)
	FASTPROXY_PURE=1 FASTPROXY_EXPECT_FORM=pure $(PY) -m pytest $(PURE_TESTS) --benchmark-disable -q $(TEST_ARGS)

test-pure: $(VENV) ebpf
	FASTPROXY_PURE=1 FASTPROXY_EXPECT_FORM=pure $(PY) -m pytest tests bench --benchmark-disable -q $(TEST_ARGS)

# The long fault suite: every scenario at full length, ending with the scenario table.
faults: $(VENV) compiled ebpf
	FAULTS_LONG=1 $(PY) -m pytest tests/faults -q --timeout=900 $(TEST_ARGS)

bench: $(VENV) compiled
	$(PY) -m pytest bench --benchmark-only --benchmark-columns=min,median,mean,max,rounds \
		--benchmark-sort=name --benchmark-min-time=0.0002 \
		--benchmark-json=bench/results/latest.json -q $(BENCH_ARGS)
	$(PY) -m bench.report bench/results/latest.json
	$(PY) -m bench.scale --pods 1000,10000,50000 --churn 500 --rate 1000 --duration 3 --repeats 4 \
		--nginx --haproxy --max-foreign-cpu 0.4 --retries 2 --quiet-wait 12 $(SCALE_ARGS)
	$(PY) -m bench.e2e --duration 5 --repeats 3 --nginx --haproxy $(E2E_ARGS)
	$(MAKE) --no-print-directory instructions memory ratios

# Instructions per in-memory exchange under callgrind (repeatable on a noisy machine), with where
# they go; and the router's RSS holding 1 / 50k pods (routes file, Valkey bootstrap).
instructions: $(VENV) compiled
	$(PY) -m bench.instructions --annotate 25 --calls 30 $(INSTRUCTIONS_ARGS)

memory: $(VENV) compiled
	$(PY) -m bench.memory --tracemalloc 12 $(MEMORY_ARGS)

# Issue 15's ratios to nginx and HAProxy, side by side (installs nginx, haproxy, wrk when root):
# GET / with SSE and --workers 1 vs 2, then the OpenAI-style POST.
ratios: $(VENV) compiled
	$(PY) -m bench.ratios --payload get $(RATIOS_ARGS)
	$(PY) -m bench.ratios --payload chat --no-sse --no-workers $(RATIOS_ARGS)

lint: $(VENV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy statesync fastproxy/snapshot.py fastproxy/slots.py

clean:
	-$(PY) scripts/build_compiled.py --clean
	rm -rf $(VENV) .pytest_cache .benchmarks .mypy_cache .ruff_cache .hypothesis
