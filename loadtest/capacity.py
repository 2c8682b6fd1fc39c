"""Capacity: the highest offered rate a server sustains within an SLO, found by a search over rates.

A rate passes when, in an open-loop run at that rate (``loadtest.openloop``), the p99 latency from
the intended send time is within the SLO, no request failed, and the server answered at least
``min_achieved`` of what was offered (a server that falls behind builds a queue; over a short run that
shows first as missing answers, then as latency). The search steps up (or down) geometrically from a
start rate until the verdict flips, then bisects the bracket; every measured point is kept for the
throughput-vs-p99 curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

from serving.metrics import LATENCY_SLO_SECONDS


@dataclass(frozen=True)
class SLO:
    # The serving latency SLO, the one the alerts and the dashboard hold the server to.
    p99_ms: float = LATENCY_SLO_SECONDS * 1000
    max_errors: int = 0
    min_achieved: float = 0.98  # achieved / offered

    def violations(self, point: Point) -> list[str]:
        """What a point breaks, in words; empty when it passes."""
        out = []
        if point.p99_ms > self.p99_ms:
            out.append(f"p99 {point.p99_ms:.1f} ms > {self.p99_ms:g} ms")
        if point.errors > self.max_errors:
            out.append(f"{point.errors} errors")
        if point.offered_rps > 0 and point.achieved_rps < self.min_achieved * point.offered_rps:
            out.append(f"achieved {point.achieved_rps:.0f} < {self.min_achieved:.0%} of {point.offered_rps:.0f} req/s")
        return out

    def passes(self, point: Point) -> bool:
        return not self.violations(point)


@dataclass
class Point:
    """One measured rate (a subset of ``openloop.RunResult``, plus anything the caller adds)."""

    offered_rps: float
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    extra: dict | None = None


@dataclass
class Search:
    capacity: Point | None  # the highest passing offered rate; None: even the lowest rate failed
    points: list[Point]  # in the order measured

    @property
    def capacity_rps(self) -> float:
        return self.capacity.offered_rps if self.capacity else 0.0


@dataclass(frozen=True)
class SearchPlan:
    """How a capacity search goes.

    Args:
        slo: what a rate must meet to count as served.
        step: factor between rates while looking for a bracket.
        resolution: stop bisecting when the bracket's upper end is within this fraction of its lower.
        max_points: budget of measurements (each costs a run).
        min_rps: the lowest rate tried before giving up (no capacity at all).
    """

    slo: SLO = SLO()
    step: float = 1.4
    resolution: float = 0.05
    max_points: int = 8
    min_rps: float = 1.0


def capacity_steps(start_rps: float, plan: SearchPlan = SearchPlan()) -> Generator[float, Point, Search]:
    """The search as a generator: yields the next rate to measure, is sent its ``Point``, returns the
    ``Search`` (see ``search_capacity``). Several searches can so be stepped in turn (``search_lockstep``)."""
    slo, step, resolution, max_points = plan.slo, plan.step, plan.resolution, plan.max_points
    if start_rps <= 0 or step <= 1 or max_points < 1:
        raise ValueError(f"need start_rps > 0, step > 1, max_points >= 1; got {start_rps}, {step}, {max_points}")
    points: list[Point] = []
    lo = hi = None  # highest passing / lowest failing rate measured
    rate = start_rps
    while len(points) < max_points:
        p = yield rate
        points.append(p)
        if slo.passes(p):
            lo = rate if lo is None else max(lo, rate)
            if hi is not None:
                break
            rate *= step
        else:
            hi = rate if hi is None else min(hi, rate)
            if lo is not None:
                break
            rate /= step
            if rate < plan.min_rps:
                break
    while lo is not None and hi is not None and hi > lo * (1 + resolution) and len(points) < max_points:
        mid = math.sqrt(lo * hi)
        p = yield mid
        points.append(p)
        if slo.passes(p):
            lo = mid
        else:
            hi = mid
    passing = [p for p in points if slo.passes(p)]
    return Search(max(passing, key=lambda p: p.offered_rps) if passing else None, points)


def search_capacity(measure: Callable[[float], Point], start_rps: float, plan: SearchPlan = SearchPlan()) -> Search:
    """Find the highest offered rate that passes ``plan.slo``: ``measure`` runs the load at a rate
    (req/s) and returns its ``Point``; ``start_rps`` is the first rate tried (a closed-loop ceiling
    times ~0.7 is a good guess). Returns the capacity point and every point measured."""
    return search_lockstep({"_": (measure, start_rps)}, plan)["_"]


def search_lockstep(
    systems: dict[str, tuple[Callable[[float], Point], float]], plan: SearchPlan = SearchPlan()
) -> dict[str, Search]:
    """One search per system (``name -> (measure, start_rps)``), their measurements taken in turn,
    one rate of each system per round: on a machine whose background load drifts, every system sees
    the same drift instead of one getting a quiet minute and the next a busy one."""
    gens = {name: capacity_steps(start, plan) for name, (_, start) in systems.items()}
    rates = {name: next(g) for name, g in gens.items()}
    results: dict[str, Search] = {}
    while rates:
        for name in list(rates):
            point = systems[name][0](rates[name])
            try:
                rates[name] = gens[name].send(point)
            except StopIteration as done:
                results[name] = done.value
                del rates[name]
    return {name: results[name] for name in systems}


def additive_bound(core_rps: float, ceiling_rps: float) -> float:
    """No server doing the core's work (``core_rps`` alone) on top of a frontend whose own ceiling is
    ``ceiling_rps`` can exceed 1 / (1/C + 1/N) on the same cores: the per-request costs add."""
    if core_rps <= 0 or ceiling_rps <= 0:
        raise ValueError(f"throughputs must be positive, got C={core_rps}, N={ceiling_rps}")
    return 1.0 / (1.0 / core_rps + 1.0 / ceiling_rps)
