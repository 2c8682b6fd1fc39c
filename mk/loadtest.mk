# ---- load tests and serving benchmarks (loadtest/, bench/bench_serve.py) -------------------------
# make loadtest      locust, headless, against a running server (make serve); gates decide the exit code
# make bench-serve   the TorchServe sweep: variants x batch settings x workers, baselines, plot, docs
# make soak          a steady load at ~70 % of the measured maximum; RSS and latency over time
# make fault         kill a worker, restart the server, an over-limit request -- all under load;
#                    then the attack scenario: the costliest admitted requests beside normal users

HOST           ?= http://127.0.0.1:8080
USERS          ?= 16
SPAWN_RATE     ?= $(USERS)
DURATION       ?= 60s
P95_MS         ?= 200
P99_MS         ?= 500
MAX_ERROR_RATE ?= 0.01
MALFORMED      ?= 0.02
LOADTEST_RUNS  ?=
MANAGEMENT     ?= http://127.0.0.1:8081
SHAPE          ?=
REPORTS        ?= reports
LOADTEST_ARGS  ?=
VENV_LOADTEST  := $(VENV_BASE)

.PHONY: loadtest bench-serve soak fault

loadtest: $(VENV_LOADTEST) ## [HOST= USERS= DURATION=60s] locust against the running server (make serve); gates decide the exit code
	@mkdir -p $(REPORTS)
	$(PY) -m locust -f loadtest/locustfile.py$(if $(filter step,$(SHAPE)),$(comma)loadtest/shapes.py) \
	  --headless --host $(HOST) --users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(DURATION) \
	  --only-summary --csv $(REPORTS)/loadtest --html $(REPORTS)/loadtest.html --json-file $(REPORTS)/loadtest \
	  --p95-ms $(P95_MS) --p99-ms $(P99_MS) --max-error-rate $(MAX_ERROR_RATE) --malformed-share $(MALFORMED) \
	  --gate-file $(REPORTS)/loadtest_gate.json $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	  --management-url $(MANAGEMENT) $(if $(LOADTEST_RUNS),--runs $(LOADTEST_RUNS)) $(LOADTEST_ARGS)

BENCH_ARGS ?=
bench-serve: $(VENV_LOADTEST) ## the TorchServe sweep: variants x batch settings x workers, baselines, plot, docs
	$(PY) bench/bench_serve.py --reports $(REPORTS) $(BENCH_ARGS)

# A soak is 10 minutes unless DURATION is given (60s, make loadtest's default, is too short to show drift).
soak: $(VENV_LOADTEST) ## [DURATION=10m] steady load at ~70 % of the measured maximum; RSS and latency over time
	$(PY) -m loadtest.resilience soak --duration $(if $(filter file,$(origin DURATION)),10m,$(DURATION)) \
	  --reports $(REPORTS) $(LOADTEST_ARGS)

fault: $(VENV_LOADTEST) ## kill a worker, restart, over-limit requests under load; then the attack scenario
	$(PY) -m loadtest.resilience fault --reports $(REPORTS) $(LOADTEST_ARGS)
	$(PY) -m loadtest.resilience attack --reports $(REPORTS) $(LOADTEST_ARGS)
