"""Every metric the service exports, declared once; the handler's emitting side; metrics.yaml and the docs table.

TorchServe exports metrics on its metrics port (``metrics_mode=prometheus``) only when they are declared
in the ``metrics_config`` file (``serving/metrics.yaml``). That file, the metric table in
``docs/metrics.md``, the handler's metric names and the names the dashboard and alert rules query all
come from ``METRICS`` below (``python deploy/observability.py`` writes the generated files; the tests
fail when one has drifted).

Histograms: TorchServe 0.12's frontend builds every histogram with the Prometheus Java client's default
buckets, ``0.005 0.01 0.025 0.05 0.075 0.1 0.25 0.5 0.75 1 2.5 5 7.5 10 +Inf``, and has no setting to
change them (``PrometheusHistogram`` calls ``Histogram.build()`` without ``.buckets``). So the unit of
each histogram is chosen to put its interesting range inside those bounds:
  - request latency in **seconds** (5 ms .. 10 s): the 50 ms SLO is exactly the ``le="0.05"`` bucket,
    so the share of slow requests is exact, not interpolated;
  - stage times in **milliseconds** (5 us .. 10 ms): a batch's decode, preprocess and forward pass on
    these small models; anything above 10 ms lands in +Inf and shows as 10 ms in quantiles;
  - batch size in **requests** (1, 2.5, 5, 7.5, 10): exact mean from _sum/_count, coarse quantiles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # serving.core imports nothing from here; only for the type name
    from serving.core import StageTimes

# The latency SLO the alerts and the dashboard use: 99 % of requests answered within 50 ms. It must be
# one of the histogram's bucket bounds above (seconds) for the slow share to be exact.
LATENCY_SLO_SECONDS = 0.05
LATENCY_SLO_TARGET = 0.99
# Availability SLO: 99.9 % of requests get no 5xx (4xx are the client's errors, not the service's).
AVAILABILITY_SLO_TARGET = 0.999
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

KINDS = ("counter", "gauge", "histogram")
# Where a metric comes from: TorchServe's frontend (declared under ts_metrics); the worker process,
# declared under model_metrics (TorchServe adds Hostname) and emitted by our handler or by TorchServe's
# own service layer; or NVIDIA's DCGM exporter on GPU hosts (not declared to TorchServe at all; listed
# so that the dashboard's GPU panels name metrics that exist).
SOURCES = ("frontend", "handler", "worker", "dcgm")
MODEL_METRIC_SOURCES = ("handler", "worker")


@dataclass(frozen=True)
class Metric:
    """One exported metric.

    Attributes:
        name: the Prometheus name (histograms add _bucket/_sum/_count).
        kind: counter, gauge or histogram.
        unit: TorchServe's unit string (only shown in the HELP line).
        labels: the dimensions declared to TorchServe, in emission order.
        meaning: one line for the docs table.
        source: frontend, handler or dcgm.
        gpu: exists only on hosts with a GPU (dashboard panels fed by it are marked GPU-only).
    """

    name: str
    kind: str
    unit: str
    labels: tuple[str, ...]
    meaning: str
    source: str
    gpu: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.source not in SOURCES:
            raise ValueError(f"metric {self.name}: source {self.source!r} is not one of {SOURCES}")

    @property
    def exported_labels(self) -> tuple[str, ...]:
        """Labels as scraped: TorchServe adds Hostname to model metrics; histograms add le to _bucket."""
        return self.labels + (("Hostname",) if self.source in MODEL_METRIC_SOURCES else ())


_HOST = ("Level", "Hostname")  # Level="Host" on every frontend host metric
_TS_MODEL = ("model_name", "model_version", "hostname")
_MODEL = ("ModelName", "Level")  # Level="Model" on every handler metric

METRICS: tuple[Metric, ...] = (
    # ---- TorchServe frontend: requests ------------------------------------------------------------
    Metric(
        "Requests2XX",
        "counter",
        "Count",
        _HOST,
        "2xx responses on every port, /metrics scrapes and /ping probes included",
        "frontend",
    ),
    Metric(
        "Requests4XX",
        "counter",
        "Count",
        _HOST,
        "responses with a 4xx status (bad input, unknown model, token), all models",
        "frontend",
    ),
    Metric(
        "Requests5XX",
        "counter",
        "Count",
        _HOST,
        "responses with a 5xx status (the availability SLO's errors); no series before the first 5xx",
        "frontend",
    ),
    Metric(
        "ts_inference_requests_total",
        "counter",
        "Count",
        _TS_MODEL,
        "inference requests per model, whatever their status (the availability SLO's denominator)",
        "frontend",
    ),
    Metric(
        "ts_inference_latency_microseconds",
        "counter",
        "Microseconds",
        _TS_MODEL,
        "summed frontend time per request (queue + worker): rate / request rate = mean latency; "
        "rate / 1e6 = requests in the server (Little's law)",
        "frontend",
    ),
    Metric(
        "ts_queue_latency_microseconds",
        "counter",
        "Microseconds",
        _TS_MODEL,
        "summed time requests waited in the model's queue: rate / 1e6 = mean queue depth (Little's law)",
        "frontend",
    ),
    Metric("QueueTime", "gauge", "Milliseconds", _HOST, "queue time of the latest request (any model)", "frontend"),
    Metric(
        "WorkerThreadTime",
        "gauge",
        "Milliseconds",
        _HOST,
        "frontend time around the latest batch, outside the worker",
        "frontend",
    ),
    Metric(
        "WorkerLoadTime",
        "gauge",
        "Milliseconds",
        ("WorkerName", *_HOST),
        "time the worker took to (re)load; its value changes on every worker restart "
        "(WorkerName is W-<port>-<model>_<version>)",
        "frontend",
    ),
    # ---- TorchServe frontend: host (its system-metrics collector, every minute) ------------------
    Metric("CPUUtilization", "gauge", "Percent", _HOST, "host CPU utilisation", "frontend"),
    Metric("MemoryUsed", "gauge", "Megabytes", _HOST, "host memory in use", "frontend"),
    Metric("MemoryAvailable", "gauge", "Megabytes", _HOST, "host memory available", "frontend"),
    Metric("MemoryUtilization", "gauge", "Percent", _HOST, "host memory in use", "frontend"),
    Metric("DiskAvailable", "gauge", "Gigabytes", _HOST, "free space on /", "frontend"),
    Metric("DiskUtilization", "gauge", "Percent", _HOST, "space used on /", "frontend"),
    # ---- the handler (serving/handler.py through HandlerMetrics below) ---------------------------
    Metric(
        "RequestLatencySeconds",
        "histogram",
        "s",
        _MODEL,
        "per request answered 200: seconds in the worker, from the batch reaching the handler to the "
        "response (queueing before the worker is in ts_queue_latency_microseconds)",
        "handler",
    ),
    Metric("DecodeTime", "histogram", "ms", _MODEL, "per batch: image decoding (Pillow), ms", "handler"),
    Metric(
        "PreprocessTime", "histogram", "ms", _MODEL, "per batch: mode, invert, resize to the contract, ms", "handler"
    ),
    Metric("InferenceTime", "histogram", "ms", _MODEL, "per batch: the variant's forward pass, ms", "handler"),
    Metric(
        "BatchSize",
        "histogram",
        "count",
        _MODEL,
        "requests in each batch TorchServe formed (1 .. the archive's batch_size)",
        "handler",
    ),
    Metric(
        "RejectedInputs",
        "counter",
        "count",
        (*_MODEL, "Reason"),
        "requests the handler refused, by reason (the error body's type: not_an_image, ...)",
        "handler",
    ),
    Metric(
        "WorkerStarts",
        "counter",
        "count",
        _MODEL,
        "worker processes that began loading the model (initial workers and every restart)",
        "handler",
    ),
    Metric(
        "AnsweredImages",
        "counter",
        "count",
        (*_MODEL, "Ood"),
        "images answered 200, by the out-of-distribution flag (Ood true / false; unscored: a model "
        "exported before the detector existed); both flags are counted from the first batch",
        "handler",
    ),
    Metric(
        "OodBaselineShare",
        "gauge",
        "ratio",
        _MODEL,
        "share of held-out in-distribution images (test split) the model's detector flags, measured at "
        "export (manifest ood.heldout): the drift alert's baseline; set at each worker start",
        "handler",
    ),
    Metric(
        "VariantFallbacks",
        "counter",
        "count",
        (*_MODEL, "Variant"),
        "workers whose variant failed the reference check at load (export.runtime.reference_check) and "
        "fell back to the next packed variant, by the variant that failed",
        "handler",
    ),
    Metric(
        "PredictionTime",
        "gauge",
        "ms",
        _MODEL,
        "the latest batch's whole handle() time, emitted by TorchServe's service layer",
        "worker",
    ),
    # ---- NVIDIA DCGM exporter (GPU hosts; scraped from the exporter, not TorchServe) --------------
    Metric(
        "DCGM_FI_DEV_GPU_UTIL",
        "gauge",
        "Percent",
        ("gpu", "UUID", "Hostname"),
        "GPU utilisation, per GPU",
        "dcgm",
        gpu=True,
    ),
    Metric(
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "MiB",
        ("gpu", "UUID", "Hostname"),
        "GPU framebuffer memory in use, per GPU",
        "dcgm",
        gpu=True,
    ),
    Metric(
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "MiB",
        ("gpu", "UUID", "Hostname"),
        "GPU framebuffer memory free, per GPU",
        "dcgm",
        gpu=True,
    ),
)
BY_NAME = {m.name: m for m in METRICS}
assert len(BY_NAME) == len(METRICS), "a metric is declared twice"
assert LATENCY_SLO_SECONDS in DEFAULT_BUCKETS, "the latency SLO must be a histogram bucket bound"


def series_names(metric: Metric) -> tuple[str, ...]:
    """The series names a metric is scraped as."""
    if metric.kind == "histogram":
        return tuple(metric.name + s for s in ("_bucket", "_sum", "_count"))
    return (metric.name,)


# --------------------------------------------------------------------------------------------------
# emitting (the handler)
# --------------------------------------------------------------------------------------------------
class HandlerMetrics:
    """The handler's metrics through TorchServe's metric cache (``context.metrics``); one call per event.

    TorchServe sends each value from the worker's log stream to the frontend, which keeps the Prometheus
    series. ``cache=None`` (a handler built without TorchServe) records nothing.
    """

    def __init__(self, cache, model_name: str) -> None:
        self.model = model_name
        self._metrics = {}
        if cache is None:
            return
        from ts.metrics.metric_type_enum import MetricTypes  # only inside a TorchServe worker

        for m in METRICS:
            if m.source == "handler":
                self._metrics[m.name] = cache.add_metric_to_cache(
                    m.name, m.unit, list(m.labels), MetricTypes[m.kind.upper()]
                )

    def _emit(self, name: str, value: float, request_id: str | None, *extra: str) -> None:
        metric = self._metrics.get(name)
        if metric is not None:
            metric.add_or_update(value, [self.model, "Model", *extra], request_id or "")

    def worker_started(self) -> None:
        self._emit("WorkerStarts", 1, None)

    def fallback(self, variant: str) -> None:
        self._emit("VariantFallbacks", 1, None, variant)

    def rejected(self, reason: str, request_id: str | None = None) -> None:
        self._emit("RejectedInputs", 1, request_id, reason)

    def ood_baseline(self, share: float) -> None:
        self._emit("OodBaselineShare", share, None)

    def answered_images(self, answered: int, ood: int | None, request_id: str | None = None) -> None:
        """Images answered 200 in a batch, ``ood`` of them flagged (None: the model has no detector).
        Both flags are emitted, 0 included, so the share has a numerator and a denominator series
        from the first batch on (an absent series reads as "no data", not 0)."""
        if ood is None:
            self._emit("AnsweredImages", answered, request_id, "unscored")
            return
        self._emit("AnsweredImages", ood, request_id, "true")
        self._emit("AnsweredImages", answered - ood, request_id, "false")

    def batch(
        self, n_requests: int, answered_200: int, started: float, times: StageTimes, request_id: str | None = None
    ) -> None:
        """One handled batch: its size, the stage times (when the model ran), each 200's latency.

        Args:
            n_requests: requests in the batch TorchServe formed.
            answered_200: how many of them got a 200 (each observes the batch's time once).
            started: ``time.perf_counter()`` when handle() began.
            times: the batch's stage times (ms, summed over its images).
        """
        seconds = time.perf_counter() - started
        self._emit("BatchSize", n_requests, request_id)
        if answered_200:
            self._emit("DecodeTime", round(times.decode_ms, 3), request_id)
            self._emit("PreprocessTime", round(times.preprocess_ms, 3), request_id)
            self._emit("InferenceTime", round(times.inference_ms, 3), request_id)
        for _ in range(answered_200):
            self._emit("RequestLatencySeconds", round(seconds, 6), request_id)


# --------------------------------------------------------------------------------------------------
# generated files
# --------------------------------------------------------------------------------------------------
def render_metrics_yaml() -> str:
    """serving/metrics.yaml: what TorchServe exports (frontend -> ts_metrics, handler -> model_metrics)."""
    lines = [
        "# GENERATED from serving/metrics.py by `python deploy/observability.py`: edit that, not this.",
        "# TorchServe exports on its metrics port (metrics_mode=prometheus) only the metrics declared here.",
        "# Model metrics get a Hostname label from TorchServe.",
    ]
    for section, sources in (("ts_metrics", ("frontend",)), ("model_metrics", MODEL_METRIC_SOURCES)):
        lines.append(f"{section}:")
        for kind in KINDS:
            chosen = [m for m in METRICS if m.source in sources and m.kind == kind]
            if not chosen:
                continue
            lines.append(f"  {kind}:")
            for m in chosen:
                lines += [
                    f"    - name: {m.name}",
                    f"      unit: {m.unit}",
                    f"      dimensions: [{', '.join(m.labels)}]",
                ]
    return "\n".join(lines) + "\n"


def render_table() -> str:
    """The markdown metric table (docs/metrics.md)."""
    rows = ["| name | type | labels | source | meaning |", "|---|---|---|---|---|"]
    for m in METRICS:
        name = f"`{m.name}`" + (" (GPU)" if m.gpu else "")
        rows.append(f"| {name} | {m.kind} ({m.unit}) | {', '.join(m.exported_labels)} | {m.source} | {m.meaning} |")
    return "\n".join(rows) + "\n"
