# ---- observability: metrics, dashboard, SLO rules (serving/metrics.py, deploy/observability.py) -----
# make observability      regenerate metrics.yaml, the dashboard, the rules, the PrometheusRule, the docs table
# make prometheus-tools   prometheus + promtool (Debian's 2.42) for the tests: the ones on PATH, else the
#                         Debian package unpacked into .tools/ (apt-get download: no root, no service)
PROM_TOOLS := .tools/prometheus/usr/bin

.PHONY: observability prometheus-tools
observability: $(VENV_SERVE) ## regenerate metrics.yaml, the dashboard, the rules, the PrometheusRule, the docs table
	$(PY) deploy/observability.py

# Never fails make: when nothing works, tests/test_observability.py fails with one line saying so.
prometheus-tools: ## prometheus + promtool for the tests (on PATH, else Debian's package unpacked into .tools/)
	@if { command -v promtool && command -v prometheus; } >/dev/null || [ -x $(PROM_TOOLS)/promtool ]; then exit 0; fi; \
	mkdir -p .tools && cd .tools && rm -f prometheus_*.deb; \
	{ apt-get download prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
	  && dpkg-deb -x prometheus_*.deb prometheus && rm -f prometheus_*.deb && echo "prometheus-tools: $$(prometheus/usr/bin/promtool --version 2>&1 | head -1) in .tools/" \
	  || echo "warning: could not get Debian's prometheus package (apt-get download prometheus); the Prometheus tests will fail until prometheus and promtool are on PATH" >&2

test: prometheus-tools
