"""Prometheus metrics of the Open Inference Protocol runtime, under the names TorchServe exports.

Every name, kind and label comes from ``serving.metrics.METRICS`` (the one list the dashboard, the
alert rules and docs/metrics.md are generated from), so one dashboard and one rule file serve both
runtimes. The "frontend" metrics TorchServe's Java frontend keeps (request counts by status, per-model
request and queue time, worker load time, host utilisation) are kept here by the runtime itself; the
handler's own metrics arrive through ``TsMetricsCache``, which stands in for TorchServe's metric cache
(``context.metrics``) with the same ``add_metric_to_cache`` / ``add_or_update`` API.

Worker processes share the values through ``prometheus_client``'s multiprocess mode (files under
``PROMETHEUS_MULTIPROC_DIR``, which the supervisor sets before any worker starts): a scrape of any
worker returns the sum over all of them. The exposition is written here so that counters keep
TorchServe's names (``Requests2XX``, not ``Requests2XX_total``).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from serving.metrics import BY_NAME, DEFAULT_BUCKETS, METRICS, Metric

HOSTNAME = socket.gethostname()
EXPORTED_SOURCES = ("frontend", "handler", "worker")  # dcgm metrics come from NVIDIA's exporter
HOST_METRICS = (
    "CPUUtilization",
    "MemoryUsed",
    "MemoryAvailable",
    "MemoryUtilization",
    "DiskAvailable",
    "DiskUtilization",
)  # read at scrape time, not kept
GAUGE_MODE: Final = "mostrecent"  # a gauge is "the latest value" in TorchServe too


def prepare_multiprocess_dir(path: Path) -> None:
    """An empty folder for the workers' metric files (a restart must not add up old runs)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _build() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    made: dict[str, Any] = {}
    for m in METRICS:
        if m.source not in EXPORTED_SOURCES or m.name in HOST_METRICS:
            continue
        labels = list(m.exported_labels)
        if m.kind == "counter":
            made[m.name] = Counter(m.name, m.meaning, labels, registry=None)
        elif m.kind == "gauge":
            made[m.name] = Gauge(m.name, m.meaning, labels, registry=None, multiprocess_mode=GAUGE_MODE)
        else:
            made[m.name] = Histogram(m.name, m.meaning, labels, registry=None, buckets=DEFAULT_BUCKETS)
    return made


class WorkerMetrics:
    """The metrics one worker process records; one call per event."""

    def __init__(self) -> None:
        self._m = _build()
        self._bound: dict[tuple, Callable[[float], None]] = {}
        for status in (200, 400, 500):  # every status class exported from the start, 0 until it happens
            self.record(f"Requests{status // 100}XX", 0, "Host")

    def record(self, name: str, value: float, *labels: str) -> None:
        key = (name, labels)
        update = self._bound.get(key)
        if update is None:
            update = self._bound[key] = self._bind(name, labels)
        update(value)

    def _bind(self, name: str, labels: tuple[str, ...]) -> Callable[[float], None]:
        """The update function of one series (looked up once: ``labels()`` takes a lock and a dict walk)."""
        metric = self._m.get(name)
        if metric is None:  # not declared: TorchServe would not export it either
            return lambda _value: None
        decl = BY_NAME[name]
        if len(labels) < len(decl.exported_labels):  # the host's name, added to every model metric
            labels = (*labels, HOSTNAME)
        bound = metric.labels(*labels)
        return getattr(bound, {"counter": "inc", "gauge": "set", "histogram": "observe"}[decl.kind])

    # ---- the frontend's metrics ----------------------------------------------------------------
    def response(self, status: int) -> None:
        self.record(f"Requests{status // 100}XX", 1, "Host")

    def inference(self, model: str, version: str, seconds: float, queued_s: float) -> None:
        self.record("ts_inference_requests_total", 1, model, version, HOSTNAME)
        self.record("ts_inference_latency_microseconds", seconds * 1e6, model, version, HOSTNAME)
        self.record("ts_queue_latency_microseconds", queued_s * 1e6, model, version, HOSTNAME)

    def queued(self, waits: list[float]) -> None:
        if waits:
            self.record("QueueTime", round(max(waits) * 1e3, 3), "Host")

    def worker_loaded(self, worker: str, ms: float) -> None:
        self.record("WorkerLoadTime", round(ms, 1), worker, "Host")

    def cache(self, model_name: str) -> TsMetricsCache:
        return TsMetricsCache(self, model_name)


class _Bound:
    """What ``add_metric_to_cache`` returns: ``add_or_update(value, dimension_values, request_id)``."""

    def __init__(self, sink: WorkerMetrics, name: str) -> None:
        self.sink, self.name = sink, name

    def add_or_update(self, value, dimension_values: list | None = None, request_id: str = "") -> None:
        self.sink.record(self.name, float(value), *(dimension_values or []))

    update = add_or_update


class TsMetricsCache:
    """Stands in for TorchServe's ``MetricsCacheYamlImpl`` as ``context.metrics``.

    Model metrics get the dimensions TorchServe gives them (``ModelName``, ``Level="Model"``) when the
    caller passes none, as ``add_time`` / ``add_counter`` in stock handlers do.
    """

    def __init__(self, sink: WorkerMetrics, model_name: str) -> None:
        self.sink, self.model_name = sink, model_name
        self.request_ids = None

    def set_request_ids(self, request_ids) -> None:
        self.request_ids = request_ids

    def add_metric_to_cache(
        self, metric_name: str, unit: str, dimension_names: list | None = None, metric_type=None
    ) -> _Bound:
        return _Bound(self.sink, metric_name)

    def get_metric(self, metric_name: str, metric_type=None) -> _Bound:
        return _Bound(self.sink, metric_name)

    def add_metric(
        self, name: str, value, unit: str = "", idx=None, dimensions: list | None = None, metric_type=None
    ) -> None:
        self.sink.record(name, float(value), *self._dims(dimensions))

    def add_time(self, name: str, value, idx=None, unit: str = "ms", dimensions=None, metric_type=None) -> None:
        self.add_metric(name, value, unit, idx, dimensions)

    def add_counter(self, name: str, value, idx=None, dimensions=None) -> None:
        self.add_metric(name, value, "count", idx, dimensions)

    def add_size(self, name: str, value, idx=None, unit: str = "MB", dimensions=None, metric_type=None) -> None:
        self.add_metric(name, value, unit, idx, dimensions)

    def add_percent(self, name: str, value, idx=None, dimensions=None, metric_type=None) -> None:
        self.add_metric(name, value, "percent", idx, dimensions)

    def _dims(self, dimensions) -> list[str]:
        if dimensions:
            return [getattr(d, "value", d) for d in dimensions]
        return [self.model_name, "Model"]


# --------------------------------------------------------------------------------------------------
# exposition
# --------------------------------------------------------------------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    from prometheus_client.utils import floatToGoString

    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {floatToGoString(value)}" if inner else f"{name} {floatToGoString(value)}"


def _host_samples() -> dict[str, float]:
    import psutil

    mem, disk = psutil.virtual_memory(), psutil.disk_usage("/")
    return {
        "CPUUtilization": psutil.cpu_percent(interval=None),
        "MemoryUsed": mem.used / 2**20,
        "MemoryAvailable": mem.available / 2**20,
        "MemoryUtilization": mem.percent,
        "DiskAvailable": disk.free / 2**30,
        "DiskUtilization": disk.percent,
    }


def render() -> str:
    """Prometheus text format 0.0.4 of every process's values, under TorchServe's names."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
    lines: list[str] = []
    for family in sorted(registry.collect(), key=lambda f: f.name):
        decl: Metric | None = BY_NAME.get(family.name) or BY_NAME.get(family.name + "_total")
        if decl is None:
            continue
        lines += [f"# HELP {decl.name} {decl.meaning}", f"# TYPE {decl.name} {decl.kind}"]
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            name = decl.name if decl.kind == "counter" else s.name
            # in the declared order, as TorchServe writes them (the collector sorts them by name)
            order = [*decl.exported_labels, "le"]
            labels = {k: s.labels[k] for k in order if k in s.labels}
            lines.append(_sample(name, labels, s.value))
    for name, value in _host_samples().items():
        decl = BY_NAME[name]
        lines += [
            f"# HELP {name} {decl.meaning}",
            f"# TYPE {name} gauge",
            _sample(name, {"Level": "Host", "Hostname": HOSTNAME}, value),
        ]
    return "\n".join(lines) + "\n"
