# ---- serve: artifacts/<RUN>/ -> model_store/<RUN>.mar -> TorchServe (serving/) ------------------
# make archive [RUN=x]   model_store/<RUN>.mar (no RUN: every exported run); ARCHIVE_ARGS goes to
#                        `python -m serving archive` (--variant-cpu, --batch-size, --threads, ...)
# make serve [TOKEN=1] [RUNTIME=oip]  archive what is exported but not archived, start a server in the
#                        background: TorchServe (default) or the Java-free oip runtime (OIP HTTP + gRPC)
#                        (serving/config.properties; logs in logs/serve/), return once every model in
#                        model_store/ answered a warm-up prediction, print curl commands
# make stop              stop it
# make demo-serve        serve -> post held-out digits, print predicted vs true -> stop
# make bench-hostile     the costliest request each limit admits, CPU ms on one core (docs/benchmarks.md)
ARCHIVE_ARGS ?=
SERVE_ARGS   ?=
TOKEN        ?=
RUNTIME      ?=
DEMO_COUNT   ?=

.PHONY: archive serve stop demo-serve bench-hostile bench-protocol
archive: $(VENV_SERVE) ## [RUN=x ARCHIVE_ARGS=...] model_store/<RUN>.mar (no RUN: every exported run)
ifeq ($(RUN),)
	@runs=$$(ls artifacts/*/manifest.json 2>/dev/null | cut -d/ -f2 || true); \
	if [ -z "$$runs" ]; then echo "error: nothing exported in artifacts/; run make export first" >&2; exit 2; fi; \
	for r in $$runs; do $(PY) -m serving archive --run $$r $(ARCHIVE_ARGS) || exit 1; done
else
	$(PY) -m serving archive --run $(RUN) $(ARCHIVE_ARGS)
endif

serve: $(VENV_SERVE) ## [TOKEN=1 RUNTIME=oip] start a server in the background (TorchServe, or the oip runtime), warm every model up, print curl commands
	$(PY) -m serving serve $(if $(RUNTIME),--runtime $(RUNTIME)) $(if $(TOKEN),--token) $(ARCHIVE_ARGS) $(SERVE_ARGS)

stop: $(VENV_SERVE) ## stop the server make serve started
	$(PY) -m serving stop

# Always stops the server, also when the client fails (its exit status is kept).
demo-serve: $(VENV_SERVE) ## serve -> post held-out digits, print predicted vs true -> stop
	$(PY) -m serving serve --no-examples $(if $(RUNTIME),--runtime $(RUNTIME)) $(ARCHIVE_ARGS) $(SERVE_ARGS)
	status=0; $(PY) -m serving.client demo --run $(DEMO_RUN) $(if $(DEMO_COUNT),--count $(DEMO_COUNT)) || status=$$?; \
	$(PY) -m serving stop; exit $$status

bench-hostile: $(VENV_SERVE) ## the costliest request each limit admits, CPU ms on one core
	$(PY) bench/bench_hostile.py --docs docs/benchmarks.md --json $(or $(REPORTS),reports)/hostile.json

bench-protocol: $(VENV_ALL) ## both runtimes: tritonclient HTTP and gRPC calls, 2,000 pipelined requests, Connection: close
	$(PY) bench/bench_protocol.py --docs docs/benchmarks.md --reports $(or $(REPORTS),reports)
