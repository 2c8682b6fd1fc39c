"""The dashboard panels and the SLO rules, each listed once; every observability file generated from them.

    python deploy/observability.py            # (re)write the generated files
    python deploy/observability.py --check    # exit 1 naming each file that differs (tests run this)

Generated (never edit by hand):
  serving/metrics.yaml                         what TorchServe exports (from serving/metrics.py)
  docs/metrics.md (between the table markers)  the metric table (from serving/metrics.py)
  deploy/grafana/visionpipe-dashboard.json     the Grafana dashboard (from PANELS)
  deploy/prometheus/visionpipe-rules.yml       recording + alert rules, plain (docker-compose, promtool)
  deploy/k8s/monitoring/prometheusrule.yaml    the same groups as a PrometheusRule (kube-prometheus-stack)

The SLOs (serving/metrics.py, which states their numbers): availability, a share of requests without a
5xx; latency, a share of requests answered within ``LATENCY_SLO_SECONDS`` in the handler. Alerts are the multi-window, multi-burn-rate ones of Google's SRE workbook
(ch. 5, "Alerting on SLOs"), for a 30-day budget: page when 2 % of the budget burns in 1 h (burn rate
14.4, 1 h and 5 m windows) or 5 % in 6 h (6, 6 h and 30 m); ticket when 10 % burns in 3 d (1, 3 d and
6 h). The short window makes an alert stop soon after the burn stops. "p99 over the bound" is the same
statement as "more than 1 % of requests slower than the bound", which the histogram's bucket at that
bound counts exactly.

Input drift: each answer says whether its image looks like the training data (export/ood.py). Export
measures the share its detector flags on held-out in-distribution images (~5 % by construction);
every worker publishes it (``OodBaselineShare``). ``VisionpipeOodDrift`` fires when the share of
answered images flagged exceeds ``OOD_DRIFT_FACTOR`` times that baseline over both a long and a short
window (the SLO alerts' two-window shape: the long one for significance, the short one to stop soon
after the drift does) on at least ``OOD_MIN_IMAGES`` images in the long window.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: import the project's metric declarations

from serving.metrics import (AVAILABILITY_SLO_TARGET, LATENCY_SLO_SECONDS, LATENCY_SLO_TARGET,  # noqa: E402
                             render_metrics_yaml, render_table)

# The scrape job: docker-compose's job_name and, in Kubernetes, the Service name the ServiceMonitor's
# targets get as their job label. Rules select on it so another TorchServe in the same Prometheus
# cannot feed our SLOs.
JOB = "visionpipe-serve"
SEL = f'job="{JOB}"'
RULE_GROUP = "visionpipe-slo"


# --------------------------------------------------------------------------------------------------
# Prometheus rules
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BurnAlert:
    """Both windows burn the budget faster than ``burn`` (SRE workbook table 5-8)."""

    severity: str
    burn: float
    long: str
    short: str
    for_: str


BURN_ALERTS = (BurnAlert("critical", 14.4, "1h", "5m", "2m"), BurnAlert("critical", 6.0, "6h", "30m", "15m"),
               BurnAlert("warning", 1.0, "3d", "6h", "1h"))
WINDOWS = sorted({w for a in BURN_ALERTS for w in (a.long, a.short)},
                 key=lambda w: int(w[:-1]) * {"m": 60, "h": 3600, "d": 86400}[w[-1]])

def _share_5xx(window: str, sel: str = "", sep: str = " ") -> str:
    """Share of inference requests answered 5xx.

    Denominator: ts_inference_requests_total, not Requests2XX+4XX+5XX: TorchServe counts in Requests2XX
    every 2xx it sends on any port, Prometheus's own scrapes of /metrics and every /ping probe
    included (measured: one each), which would dilute the error share. Requests5XX has no series
    before the first 5xx (``or on() vector(0)``); 0/0 is NaN: no traffic, no verdict.
    """
    return (f"(sum(rate(Requests5XX{{{sel}}}{window})) or on() vector(0)){sep}/{sep}"
            f"sum(rate(ts_inference_requests_total{{{sel}}}{window}))")


# SLI name -> (error budget, expression of the bad share over [W], labels it is kept by, what it is)
SLIS = {
    "availability": (round(1 - AVAILABILITY_SLO_TARGET, 6), _share_5xx("[W]", SEL, "\n"), (),
                     "answered with a 5xx"),
    "latency": (round(1 - LATENCY_SLO_TARGET, 6),
                f'1 - (\n  sum by (ModelName) (rate(RequestLatencySeconds_bucket{{{SEL},le="{LATENCY_SLO_SECONDS:g}"}}[W]))\n'
                f'  /\n  sum by (ModelName) (rate(RequestLatencySeconds_count{{{SEL}}}[W]))\n)',
                ("ModelName",), f"slower than {LATENCY_SLO_SECONDS * 1000:g} ms"),
}


def record_name(sli: str, window: str) -> str:
    return f"visionpipe:{sli}_bad:ratio_rate{window}"


# Drift: the out-of-distribution share of answered images against what export measured on held-out
# in-distribution images. A factor of 3 over a ~5 % baseline is 15 %: with 100 images in the long
# window that is 4.6 binomial standard deviations above the baseline (sd 2.2 %), so chance alone does
# not page; a real shift of inputs (a new camera, a new client sending other things) does.
OOD_DRIFT_FACTOR = 3.0
OOD_MIN_IMAGES = 100
OOD_WINDOWS = ("1h", "5m")  # long, short
OOD_FOR = "10m"
# A baseline of 0 (a detector that flagged no held-out image) would make any flagged image a drift.
OOD_BASELINE_FLOOR = 0.01


def ood_share(window: str, sel: str = SEL, by: str = "ModelName") -> str:
    """Share of the images answered 200 that the detector flagged, per model (models without a
    detector count as Ood="unscored" and are left out)."""
    return (f'sum by ({by}) (rate(AnsweredImages{{{sel},Ood="true"}}[{window}]))\n/\n'
            f'sum by ({by}) (rate(AnsweredImages{{{sel},Ood=~"true|false"}}[{window}]))')


def ood_record(window: str) -> str:
    return f"visionpipe:ood:ratio_rate{window}"


def rule_groups() -> list[dict]:
    """The rule groups: SLI recording rules per window, then the alerts."""
    records = [{"record": record_name(sli, w), "expr": expr.replace("[W]", f"[{w}]")}
               for sli, (_budget, expr, _by, _what) in SLIS.items() for w in WINDOWS]
    records += [{"record": ood_record(w), "expr": ood_share(w)} for w in OOD_WINDOWS]
    alerts = []
    for sli, (budget, _expr, by, what) in SLIS.items():
        for a in BURN_ALERTS:
            threshold = f"({a.burn:g} * {budget:g})"
            on = f" on ({', '.join(by)})" if by else ""
            per = f" for {{{{ $labels.{by[0]} }}}}" if by else ""
            alerts.append({
                "alert": f"Visionpipe{sli.capitalize()}BurnRate{a.long}",
                "expr": f"{record_name(sli, a.long)} > {threshold}\nand{on}\n{record_name(sli, a.short)} > {threshold}",
                "for": a.for_,
                "labels": {"severity": a.severity, "slo": sli},
                "annotations": {
                    "summary": f"{sli} SLO{per}: error budget burning {a.burn:g}x ({a.long} and {a.short})",
                    "description": (f"{{{{ $value | humanizePercentage }}}} of requests in the last {a.long} "
                                    f"{what}; budget {budget:.1%}. See docs/metrics.md."),
                },
            })
    long, short = OOD_WINDOWS
    limit = f"({OOD_DRIFT_FACTOR:g} * clamp_min(max by (ModelName) (OodBaselineShare{{{SEL}}}), {OOD_BASELINE_FLOOR:g}))"
    alerts.append({
        "alert": "VisionpipeOodDrift",
        "expr": (f"{ood_record(long)} > on (ModelName) {limit}\nand on (ModelName)\n"
                 f"{ood_record(short)} > on (ModelName) {limit}\nand on (ModelName)\n"
                 f'sum by (ModelName) (increase(AnsweredImages{{{SEL},Ood=~"true|false"}}[{long}])) >= {OOD_MIN_IMAGES}'),
        "for": OOD_FOR,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "inputs drifted for {{ $labels.ModelName }}: more answers out of distribution than export measured",
            "description": (f"{{{{ $value | humanizePercentage }}}} of the images answered in the last {long} were "
                            f"flagged out of distribution, over {OOD_DRIFT_FACTOR:g}x the share export measured on "
                            f"held-out data (OodBaselineShare), in the last {short} too. Look at what clients "
                            f"send (a new source, camera or preprocessing); see docs/metrics.md."),
        },
    })
    alerts.append({
        "alert": "VisionpipeWorkerRestarted",
        # TorchServe sets WorkerLoadTime once per worker load and keeps the worker's name on a restart,
        # so a change of its value is a restart; a new worker's first value is not a change (no false
        # alert at start-up, which increase() on a per-model start counter would give).
        "expr": (f'sum by (instance, model) (\n  label_replace(changes(WorkerLoadTime{{{SEL}}}[15m]),\n'
                 f'    "model", "$1", "WorkerName", "W-[0-9]+-(.+)_[^_]+")\n) > 0'),
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "TorchServe restarted a worker of {{ $labels.model }} on {{ $labels.instance }}",
            "description": ("{{ $value }} worker restart(s) in 15 minutes: a worker process died (OOM kill, "
                            "crash in native code) and TorchServe started another. See model_log.log."),
        },
    })
    alerts.append({
        "alert": "VisionpipeNoTraffic",
        # `or on() vector(0)`: with no series at all (TorchServe down or not scraped) it still fires.
        "expr": (f"(sum by (model_name) (rate(ts_inference_requests_total{{{SEL}}}[15m])) or on() vector(0))"
                 f"\n== 0"),
        "for": "15m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "no inference requests{{ with $labels.model_name }} for {{ . }}{{ end }} in 30 minutes",
            "description": ("The request rate over 15 minutes has been 0 for 15 minutes; with no model named, "
                            "TorchServe is not scraped at all. Check the Service, the ingress and "
                            "up{job=\"" + JOB + "\"}."),
        },
    })
    return [{"name": f"{RULE_GROUP}.records", "rules": records},
            {"name": f"{RULE_GROUP}.alerts", "rules": alerts}]


# --------------------------------------------------------------------------------------------------
# Grafana dashboard
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One query of a panel, with the range its values must fall in when there is traffic (the tests)."""

    expr: str
    legend: str
    plausible: tuple[float, float] = (0.0, float("inf"))


@dataclass(frozen=True)
class Panel:
    """One dashboard panel. ``gpu``: fed by metrics that only exist on GPU hosts (DCGM exporter)."""

    title: str
    unit: str
    targets: tuple[Target, ...]
    description: str = ""
    threshold: float | None = None  # drawn as a red line (an SLO)
    gpu: bool = False
    extra: dict = field(default_factory=dict)


RI = "$__rate_interval"
M = 'ModelName=~"$model"'
TM = 'model_name=~"$model"'


def _quantile(q: float, metric: str, scale: str = "") -> str:
    return f"histogram_quantile({q}, sum by (ModelName, le) (rate({metric}_bucket{{{M}}}[{RI}]))){scale}"


PANELS: tuple[Panel, ...] = (
    Panel("Requests per second, by model", "reqps", (
        Target(f"sum by (model_name) (rate(ts_inference_requests_total{{{TM}}}[{RI}]))", "{{model_name}}"),),
        "Inference requests the frontend received (every status)."),
    Panel("Responses by status class", "reqps", tuple(
        Target(f"sum(rate(Requests{c}XX[{RI}])) or on() vector(0)", f"{c}xx") for c in (2, 4, 5)),
        "All models and ports together: TorchServe counts statuses per host, and its 2xx include every "
        "/metrics scrape and /ping probe."),
    Panel("Availability: share of requests answered 5xx", "percentunit", (
        Target(_share_5xx(f"[{RI}]"), "5xx share", (0.0, 1.0)),),
        f"5xx per inference request. SLO: at most {1 - AVAILABILITY_SLO_TARGET:.1%} (4xx are the client's).",
        threshold=round(1 - AVAILABILITY_SLO_TARGET, 6)),
    Panel("Out-of-distribution share of answered images", "percentunit", (
        Target(ood_share(RI, M).replace("\n", " "), "{{ModelName}} flagged", (0.0, 1.0)),
        Target(f"max by (ModelName) (OodBaselineShare{{{M}}})", "{{ModelName}} export baseline", (0.0, 1.0))),
        f"Images the detector flagged (export/ood.py) per image answered 200, and the share export measured "
        f"on held-out in-distribution images. VisionpipeOodDrift fires above {OOD_DRIFT_FACTOR:g}x the baseline."),
    Panel("Rejected inputs by reason", "reqps", (
        Target(f"sum by (ModelName, Reason) (rate(RejectedInputs{{{M}}}[{RI}]))", "{{ModelName}} {{Reason}}"),),
        "Requests the handler answered 4xx, by the error body's type."),
    Panel("Request latency p50 / p95 / p99 (handler)", "s", tuple(
        Target(_quantile(q, "RequestLatencySeconds"), f"{{{{ModelName}}}} p{round(q * 100)}", (0.0, 10.0))
        for q in (0.5, 0.95, 0.99)),
        f"Per request answered 200, time in the worker; SLO: p{LATENCY_SLO_TARGET * 100:g} under "
        f"{LATENCY_SLO_SECONDS * 1000:g} ms. Buckets are fixed by TorchServe (5 ms, 10 ms, 25 ms, 50 ms, ...): "
        "a quantile inside a bucket is interpolated.", threshold=LATENCY_SLO_SECONDS),
    Panel(f"Share of requests slower than {LATENCY_SLO_SECONDS * 1000:g} ms", "percentunit", (
        Target(f'1 - sum by (ModelName) (rate(RequestLatencySeconds_bucket{{{M},le="{LATENCY_SLO_SECONDS:g}"}}[{RI}]))'
               f" / sum by (ModelName) (rate(RequestLatencySeconds_count{{{M}}}[{RI}]))", "{{ModelName}}",
               (0.0, 1.0)),),
        f"SLO: at most {1 - LATENCY_SLO_TARGET:.0%}; exact (the SLO is a bucket bound).",
        threshold=round(1 - LATENCY_SLO_TARGET, 6)),
    Panel("Stage time p99 per batch: decode, preprocess, forward", "ms", tuple(
        Target(_quantile(0.99, name), f"{{{{ModelName}}}} {name}", (0.0, 10.0))
        for name in ("DecodeTime", "PreprocessTime", "InferenceTime")),
        "Milliseconds per batch, summed over its images; buckets end at 10 ms (above shows as 10)."),
    Panel("Mean latency in the frontend and mean queue time", "ms", (
        Target(f"sum by (model_name) (rate(ts_inference_latency_microseconds{{{TM}}}[{RI}])) / "
               f"sum by (model_name) (rate(ts_inference_requests_total{{{TM}}}[{RI}])) / 1000",
               "{{model_name}} in the server"),
        Target(f"sum by (model_name) (rate(ts_queue_latency_microseconds{{{TM}}}[{RI}])) / "
               f"sum by (model_name) (rate(ts_inference_requests_total{{{TM}}}[{RI}])) / 1000",
               "{{model_name}} queued")),
        "TorchServe keeps only sums here: means, no percentiles."),
    Panel("Queue depth and requests in the server (Little's law)", "short", (
        Target(f"sum by (model_name) (rate(ts_queue_latency_microseconds{{{TM}}}[{RI}])) / 1e6",
               "{{model_name}} queued"),
        Target(f"sum by (model_name) (rate(ts_inference_latency_microseconds{{{TM}}}[{RI}])) / 1e6",
               "{{model_name}} in the server")),
        "Time-averaged number of requests waiting / being served: seconds of waiting accumulated per second."),
    Panel("Batch size formed (mean, p99)", "short", (
        Target(f"sum by (ModelName) (rate(BatchSize_sum{{{M}}}[{RI}])) / sum by (ModelName) (rate(BatchSize_count{{{M}}}[{RI}]))",
               "{{ModelName}} mean", (1.0, 64.0)),
        Target(_quantile(0.99, "BatchSize"), "{{ModelName}} p99", (0.0, 10.0))),
        "Requests per handler call; up to the archive's batch_size when the batch delay fills it."),
    Panel("Worker restarts and starts", "short", (
        Target(f'sum by (model) (label_replace(changes(WorkerLoadTime[{RI}]), "model", "$1", "WorkerName", '
               f'"W-[0-9]+-(.+)_[^_]+"))', "{{model}} restarts"),
        Target(f"sum by (ModelName) (increase(WorkerStarts{{{M}}}[{RI}]))", "{{ModelName}} worker starts")),
        "Restarts: a worker's load time changed (TorchServe reloaded it). Starts: every load attempt."),
    Panel("Worker load time", "ms", (Target("WorkerLoadTime", "{{WorkerName}}", (0.0, 600_000.0)),),
          "How long each worker took to load its model, last load."),
    Panel("Host CPU and memory utilisation", "percent", (
        Target("max by (Hostname) (CPUUtilization)", "{{Hostname}} CPU", (0.0, 100.0)),
        Target("max by (Hostname) (MemoryUtilization)", "{{Hostname}} memory", (0.0, 100.0))),
        "TorchServe's system metrics, collected once a minute."),
    Panel("Host memory", "decmbytes", (
        Target("max by (Hostname) (MemoryUsed)", "{{Hostname}} used"),
        Target("max by (Hostname) (MemoryAvailable)", "{{Hostname}} available"))),
    Panel("GPU utilisation (DCGM)", "percent", (
        Target("avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL)", "{{Hostname}} GPU {{gpu}}", (0.0, 100.0)),),
        "NVIDIA's dcgm-exporter (GPU operator in Kubernetes, the gpu profile in docker-compose).", gpu=True),
    Panel("GPU memory (DCGM)", "decmbytes", (
        Target("sum by (Hostname, gpu) (DCGM_FI_DEV_FB_USED)", "{{Hostname}} GPU {{gpu}} used"),
        Target("sum by (Hostname, gpu) (DCGM_FI_DEV_FB_FREE)", "{{Hostname}} GPU {{gpu}} free")),
        "Framebuffer memory per GPU, MiB.", gpu=True),
)


def render_dashboard() -> dict:
    panels = []
    for i, p in enumerate(PANELS):
        defaults: dict = {"unit": p.unit}
        if p.threshold is not None:
            defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                    {"color": "red", "value": p.threshold}]}
            defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
        panels.append({
            "id": i + 1, "type": "timeseries", "title": p.title + (" [GPU hosts]" if p.gpu else ""),
            "description": p.description, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": 12 * (i % 2), "y": 8 * (i // 2), "w": 12, "h": 8},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": t.expr, "legendFormat": t.legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, t in enumerate(p.targets)],
            **p.extra,
        })
    models = "label_values(ts_inference_requests_total, model_name)"
    return {
        "uid": "visionpipe-serving", "title": "visionpipe / TorchServe", "tags": ["visionpipe", "torchserve"],
        "description": "GENERATED by deploy/observability.py from its PANELS list: edit that, not this.",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus", "current": {}},
            {"name": "model", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "label": "model", "includeAll": True, "multi": True, "allValue": ".*",
             "query": {"query": models, "refId": "models"}, "definition": models, "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


def dashboard_queries(dashboard: dict, rate_interval: str = "15s", model: str = ".*") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana's variables replaced as Grafana would."""
    out = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"].replace("$__rate_interval", rate_interval).replace("$model", model)))
    return out


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
class _Block(str):
    """A string dumped as a YAML literal block (multi-line PromQL stays readable)."""


yaml.SafeDumper.add_representer(_Block, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def _blocks(obj):
    if isinstance(obj, dict):
        return {k: _blocks(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_blocks(v) for v in obj]
    return _Block(obj) if isinstance(obj, str) and "\n" in obj else obj


def _dump(obj) -> str:
    return yaml.safe_dump(_blocks(obj), sort_keys=False, width=120)


GENERATED_NOTE = "# GENERATED by deploy/observability.py: edit that, not this.\n"


def render_rules() -> str:
    return (GENERATED_NOTE + "# Plain Prometheus rules: docker-compose loads this file; promtool checks and tests it\n"
            "# (deploy/prometheus/visionpipe-rules.test.yml). Kubernetes gets the same groups as a PrometheusRule.\n"
            + _dump({"groups": rule_groups()}))


def render_prometheusrule() -> str:
    obj = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "visionpipe-serve", "namespace": "visionpipe",
                        "labels": {"app.kubernetes.io/name": "visionpipe-serve", "app.kubernetes.io/part-of": "visionpipe",
                                   # kube-prometheus-stack's Prometheus selects rules by its Helm release label.
                                   "release": "kube-prometheus-stack"}},
           "spec": {"groups": rule_groups()}}
    return (GENERATED_NOTE + "# The SLO recording rules and alerts of deploy/prometheus/visionpipe-rules.yml for the\n"
            "# Prometheus operator (kube-prometheus-stack).\n" + _dump(obj))


TABLE_BEGIN, TABLE_END = "<!-- metric table: generated by deploy/observability.py -->", "<!-- end of metric table -->"


def render_docs(current: str) -> str:
    """docs/metrics.md with the table between its markers replaced."""
    if TABLE_BEGIN not in current or TABLE_END not in current:
        raise ValueError(f"docs/metrics.md: markers {TABLE_BEGIN!r} and {TABLE_END!r} not found")
    head, rest = current.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_BEGIN}\n{render_table()}{TABLE_END}{tail}"


def generated(repo: Path = REPO) -> dict[Path, str]:
    """Every generated file and the text it must have."""
    docs = repo / "docs" / "metrics.md"
    return {
        repo / "serving" / "metrics.yaml": render_metrics_yaml(),
        docs: render_docs(docs.read_text()),
        repo / "deploy" / "grafana" / "visionpipe-dashboard.json": json.dumps(render_dashboard(), indent=2) + "\n",
        repo / "deploy" / "prometheus" / "visionpipe-rules.yml": render_rules(),
        repo / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml": render_prometheusrule(),
    }


def stale(repo: Path = REPO) -> list[str]:
    """Generated files whose content differs from what they should be, relative to the repo."""
    return [str(p.relative_to(repo)) for p, text in generated(repo).items()
            if not p.exists() or p.read_text() != text]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and strings removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                   # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    keywords = {"sum", "avg", "max", "min", "count", "rate", "increase", "changes", "histogram_quantile",
                "label_replace", "vector", "and", "or", "unless", "bool", "offset", "e6", "humanizePercentage",
                "clamp_min"}
    return {w for w in words if w not in keywords and not re.fullmatch(r"e\d+", w)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/observability.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file differs")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for rel in bad:
            print(f"{rel}: out of date; regenerate it: python deploy/observability.py")
        return 1 if bad else 0
    for path, text in generated().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
