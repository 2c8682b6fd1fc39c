"""SLO gates over a load test's totals: error ratio and latency percentiles.

``check_gates`` is a pure function over ``Totals`` so it is unit-tested without locust; the locustfile
builds ``Totals`` from locust's stats at quit time and turns violations into a non-zero exit code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The gates unless --p95-ms, --p99-ms, --max-error-rate (make loadtest: P95_MS, P99_MS, MAX_ERROR_RATE)
# say otherwise: milliseconds and a fraction of requests, loose enough for locust itself sharing a
# 2-core machine with the server (docs/loadtest.md).
DEFAULT_P95_MS = 200.0
DEFAULT_P99_MS = 500.0
DEFAULT_MAX_ERROR_RATE = 0.01


@dataclass(frozen=True)
class Thresholds:
    p95_ms: float = DEFAULT_P95_MS
    p99_ms: float = DEFAULT_P99_MS
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE

    def __post_init__(self) -> None:
        if self.p95_ms <= 0 or self.p99_ms <= 0:
            raise ValueError(f"latency thresholds must be positive ms, got p95={self.p95_ms} p99={self.p99_ms}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max error rate is a fraction in [0, 1], got {self.max_error_rate}")


@dataclass(frozen=True)
class Totals:
    """What a load test measured, over all request types."""

    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 1.0


def check_gates(totals: Totals, thresholds: Thresholds) -> list[str]:
    """Return one line per broken threshold; an empty list means the run passed."""
    if totals.requests == 0:
        return ["no request completed: is the server up and the host right?"]
    broken = []
    if totals.error_rate > thresholds.max_error_rate:
        broken.append(
            f"error rate {totals.error_rate:.2%} ({totals.failures}/{totals.requests}) > "
            f"max {thresholds.max_error_rate:.2%}"
        )
    if totals.p95_ms > thresholds.p95_ms:
        broken.append(f"p95 {totals.p95_ms:.0f} ms > {thresholds.p95_ms:.0f} ms")
    if totals.p99_ms > thresholds.p99_ms:
        broken.append(f"p99 {totals.p99_ms:.0f} ms > {thresholds.p99_ms:.0f} ms")
    return broken


def gate_report(totals: Totals, thresholds: Thresholds, **extra) -> dict:
    """A JSON-able record of the run, its thresholds and the verdict."""
    broken = check_gates(totals, thresholds)
    return {
        "passed": not broken,
        "violations": broken,
        "totals": asdict(totals),
        "error_rate": totals.error_rate,
        "thresholds": asdict(thresholds),
        **extra,
    }


def format_summary(report: dict) -> str:
    t, th = report["totals"], report["thresholds"]
    lines = [
        (f"requests {t['requests']}  failures {t['failures']} ({report['error_rate']:.2%})  {t['rps']:.1f} req/s"),
        f"latency p50 {t['p50_ms']:.0f} ms  p95 {t['p95_ms']:.0f} ms  p99 {t['p99_ms']:.0f} ms",
        f"gates: p95 <= {th['p95_ms']:.0f} ms, p99 <= {th['p99_ms']:.0f} ms, "
        f"errors <= {th['max_error_rate']:.2%}: " + ("PASS" if report["passed"] else "FAIL"),
    ]
    lines += [f"  broken: {v}" for v in report["violations"]]
    for name, e in sorted(report.get("requests_by_name", {}).items()):
        lines.append(
            f"  {name:24s} {e['requests']:7d} requests {e['failures']:5d} failures  "
            f"p50 {e['p50_ms'] or 0:.0f} ms  p99 {e['p99_ms'] or 0:.0f} ms"
        )
    return "\n".join(lines)
