# ---- export: runs/<RUN>/best.pt -> artifacts/<RUN>/ (TorchScript, ONNX, INT8 variants + manifest.json)
# `make export`        every served run ($(SERVED_RUNS)); fails first, naming any checkpoint not trained yet
# `make export RUN=x`  one run; EXPORT_ARGS goes to `python -m export` (see `python -m export --help`)
EXPORT_ARGS ?=

.PHONY: export bench-export
export: $(VENV_EXPORT) ## [RUN=x EXPORT_ARGS=...] runs/<RUN>/best.pt -> artifacts/<RUN>/ (gated variants, manifest, reliability.png) + samples/<RUN>/
ifeq ($(RUN),)
	@missing=""; for r in $(SERVED_RUNS); do [ -f runs/$$r/best.pt ] || missing="$$missing runs/$$r/best.pt"; done; \
	if [ -n "$$missing" ]; then \
	  echo "error: make export needs the served runs' checkpoints; missing:$$missing. Train them (make train) or export one run: make export RUN=digits" >&2; exit 2; fi
	@for r in $(SERVED_RUNS); do $(MAKE) --no-print-directory export RUN=$$r DATA_DIR="$(DATA_DIR)" EXPORT_ARGS="$(EXPORT_ARGS)" || exit 1; done
else
	$(PY) -m export --run $(RUN) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(EXPORT_ARGS)
	$(PY) -m export.samples --run $(RUN) $(if $(DATA_DIR),--data-dir $(DATA_DIR))
	$(PY) -m export.reliability --run $(RUN) $(if $(DATA_DIR),--data-dir $(DATA_DIR))
endif

# Latency of every exported variant side by side (markdown on stdout; see docs/benchmarks.md).
bench-export: $(VENV_EXPORT) ## [RUN=x] latency of every exported variant side by side
	$(PY) bench/bench_export.py $(if $(RUN),artifacts/$(RUN),$(addprefix artifacts/,$(SERVED_RUNS)))
