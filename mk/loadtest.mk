# ---- load tests and serving benchmarks (loadtest/, bench/bench_serve.py) -------------------------
# make loadtest      locust, headless, against a running server (make serve); gates decide the exit code
# make bench-serve   the TorchServe sweep: variants x batch settings x workers, baselines, plot, docs
# make soak          a steady load at ~70 % of the measured maximum; RSS and latency over time
# make fault         kill a worker, restart the server, an over-limit request -- all under load;
#                    then the attack scenario: the costliest admitted requests beside normal users

# Forwarded only when set, so that each default has one home: HOST and MANAGEMENT (make serve's
# addresses, serving/config.properties), P95_MS, P99_MS, MAX_ERROR_RATE (loadtest/gates.py), MALFORMED
# (the locustfile's --malformed-share), DURATION of a soak (loadtest.resilience: 10 minutes).
# Make's own: locust's users (its default, 1, loads nothing) and run time (its default: forever).
USERS          ?= 16
SPAWN_RATE     ?= $(USERS)
LOADTEST_DURATION := 60s
LOADTEST_RUNS  ?=
SHAPE          ?=
REPORTS        ?= reports
LOADTEST_ARGS  ?=
VENV_LOADTEST  := $(VENV_BASE)

.PHONY: loadtest bench-serve soak fault

loadtest: $(VENV_LOADTEST) ## [HOST= USERS= DURATION=60s] locust against the running server (make serve); gates decide the exit code
	@mkdir -p $(REPORTS)
	$(PY) -m locust -f loadtest/locustfile.py$(if $(filter step,$(SHAPE)),$(comma)loadtest/shapes.py) \
	  --headless $(if $(HOST),--host $(HOST)) --users $(USERS) --spawn-rate $(SPAWN_RATE) \
	  --run-time $(or $(DURATION),$(LOADTEST_DURATION)) \
	  --only-summary --csv $(REPORTS)/loadtest --html $(REPORTS)/loadtest.html --json-file $(REPORTS)/loadtest \
	  $(if $(P95_MS),--p95-ms $(P95_MS)) $(if $(P99_MS),--p99-ms $(P99_MS)) \
	  $(if $(MAX_ERROR_RATE),--max-error-rate $(MAX_ERROR_RATE)) $(if $(MALFORMED),--malformed-share $(MALFORMED)) \
	  --gate-file $(REPORTS)/loadtest_gate.json $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	  $(if $(MANAGEMENT),--management-url $(MANAGEMENT)) $(if $(LOADTEST_RUNS),--runs $(LOADTEST_RUNS)) $(LOADTEST_ARGS)

BENCH_ARGS ?=
bench-serve: $(VENV_LOADTEST) ## the TorchServe sweep: variants x batch settings x workers, baselines, plot, docs
	$(PY) bench/bench_serve.py --reports $(REPORTS) $(BENCH_ARGS)

# A soak is 10 minutes unless DURATION is given (60 s, make loadtest's, is too short to show drift).
soak: $(VENV_LOADTEST) ## [DURATION=10m] steady load at ~70 % of the measured maximum; RSS and latency over time
	$(PY) -m loadtest.resilience soak $(if $(DURATION),--duration $(DURATION)) --reports $(REPORTS) $(LOADTEST_ARGS)

fault: $(VENV_LOADTEST) ## kill a worker, restart, over-limit requests under load; then the attack scenario
	$(PY) -m loadtest.resilience fault --reports $(REPORTS) $(LOADTEST_ARGS)
	$(PY) -m loadtest.resilience attack --reports $(REPORTS) $(LOADTEST_ARGS)
