"""Open-loop generator and capacity search: the arrival schedule, latency counted from the intended
send time (a server that stalls 200 ms once a second must show in p99; a closed loop hides it), the
search on synthetic curves, and a few-second open-loop run against a real TorchServe (slow)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from loadtest.capacity import SLO, Point, SearchPlan, additive_bound, search_capacity
from loadtest.openloop import Target, arrival_times, run_closed_loop, run_open_loop


# ---- schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [50.0, 800.0])
def test_poisson_arrivals_have_the_asked_rate_and_exponential_gaps(rate):
    duration = 4000 / rate  # ~4000 arrivals
    t = arrival_times(rate, duration, "poisson", seed=1)
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < duration
    n = len(t)
    assert abs(n - rate * duration) < 4 * np.sqrt(rate * duration)  # Poisson count: sd = sqrt(mean)
    gaps = np.diff(t)
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.001
    # and not merely "some" exponential: a constant schedule fails the same test
    assert stats.kstest(np.diff(arrival_times(rate, duration, "constant")), "expon",
                        args=(0, 1 / rate)).pvalue < 1e-6


def test_constant_arrivals_are_evenly_spaced():
    t = arrival_times(200.0, 2.0, "constant")
    assert len(t) == 400 and np.allclose(np.diff(t), 1 / 200.0)


def test_schedules_differ_by_seed_and_repeat_with_it():
    a, b = arrival_times(100, 5, seed=1), arrival_times(100, 5, seed=2)
    assert not np.array_equal(a[:10], b[:10]) and np.array_equal(a, arrival_times(100, 5, seed=1))


@pytest.mark.parametrize("kwargs", [{"rate_rps": 0, "duration_s": 1}, {"rate_rps": 1, "duration_s": -1},
                                    {"rate_rps": 1, "duration_s": 1, "process": "uniform"}])
def test_schedule_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        arrival_times(**kwargs)


# ---- latency from the intended send time, against a server that stalls ---------------------------
@pytest.fixture(scope="module")
def stalling_server():
    """A separate process answering at once, except for 200 ms once a second."""
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.stall_server", "--stall", "0.2", "--period", "1.0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


def test_open_loop_reports_the_stall_that_a_closed_loop_hides(stalling_server):
    target = Target.post(stalling_server, [b"x" * 200, b"y" * 300])
    opened = run_open_loop(target, 300, duration_s=3.0, warmup_s=0.5, seed=3)
    closed = run_closed_loop(target, connections=4, duration_s=3.0, warmup_s=0.5)
    assert opened.errors == 0 and closed.errors == 0
    # Counts of requests caught in a stall, not speeds: a busy machine adds latency to both loops
    # but cannot take the stall away from the open loop, nor put more than 4 closed-loop requests in
    # one. The schedule (offered) is the seeded Poisson one, whatever the machine.
    assert opened.offered_rps == pytest.approx(300, rel=0.1)
    # Open loop: every arrival during the first 100 ms of a stall waits over 100 ms: ~10 % of them.
    stalled_open = _waited_over(opened, 100)
    assert stalled_open >= 0.05 * opened.sent and opened.p99_ms >= 100, (stalled_open, opened)
    # Closed loop: each of 4 connections waits once per stall, and the 3.5 s run meets at most 5...
    stalled_closed = _waited_over(closed, 100)
    assert 1 <= stalled_closed <= 4 * 5, (stalled_closed, closed)
    # ...out of every request it sent: its share of stalled requests is a small part of the open loop's.
    assert stalled_closed / closed.ok < stalled_open / opened.sent / 4, (stalled_closed, closed, opened)


def _waited_over(r, ms: float) -> int:
    """How many of a run's measured requests waited ``ms`` or longer (its HDR histogram, in us)."""
    from hdrh.histogram import HdrHistogram

    h = HdrHistogram.decode(r.hdr)
    return sum(i.count_added_in_this_iter_step for i in h.get_recorded_iterator() if i.value_iterated_to >= ms * 1e3)


def test_failed_answers_and_dead_servers_are_errors(tmp_path):
    from serving.server import free_port

    target = Target.post(f"http://127.0.0.1:{free_port()}/", [b"x"])  # nothing listens there
    r = run_open_loop(target, 50, duration_s=0.5, warmup_s=0.1, timeout_s=1.0)
    assert r.ok == 0 and r.errors == r.sent > 0 and all(k.startswith("connect_error") for k in r.error_kinds)


def test_target_builds_keep_alive_posts():
    t = Target.post("http://127.0.0.1:8080/predictions/digits", [b"abc"], {"X-TopK": "1"})
    head, _, body = t.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /predictions/digits HTTP/1.1\r\n") and b"Content-Length: 3" in head
    assert b"X-TopK: 1" in head and body == b"abc"
    with pytest.raises(ValueError):
        Target.post("https://example.invalid/", [b"x"])


# ---- capacity search on synthetic curves ---------------------------------------------------------
def synthetic(knee_rps: float, errors_above: float | None = None, ceiling: float | None = None):
    """A server whose p99 grows smoothly and crosses 50 ms at ``knee_rps``."""
    calls = []

    def measure(rate: float) -> Point:
        calls.append(rate)
        p99 = 5 + 45 * (rate / knee_rps) ** 6
        achieved = min(rate, ceiling) if ceiling else rate
        errors = 3 if errors_above and rate > errors_above else 0
        return Point(rate, achieved, 2.0, p99, errors)
    return measure, calls


@pytest.mark.parametrize("start", [200.0, 1000.0, 5000.0])
def test_search_finds_the_knee_within_its_resolution(start):
    measure, calls = synthetic(1000.0)
    s = search_capacity(measure, start, SearchPlan(SLO(p99_ms=50), resolution=0.05, max_points=12))
    assert 1000 / 1.06 <= s.capacity_rps <= 1000 and len(s.points) == len(calls) <= 12
    assert SLO().passes(s.capacity) and all(p.offered_rps in calls for p in s.points)


def test_errors_and_falling_behind_bound_capacity_before_latency_does():
    measure, _ = synthetic(1000.0, errors_above=600)
    assert 560 <= search_capacity(measure, 300, SearchPlan(max_points=12)).capacity_rps <= 600
    measure, _ = synthetic(1000.0, ceiling=400)  # answers capped at 400/s: achieved < 98 % above ~408
    assert 380 <= search_capacity(measure, 300, SearchPlan(max_points=12)).capacity_rps <= 408


def test_no_capacity_when_even_the_lowest_rate_fails_and_budget_is_kept():
    measure, calls = synthetic(0.5)
    s = search_capacity(measure, 100, SearchPlan(max_points=5))
    assert s.capacity is None and s.capacity_rps == 0 and len(calls) == 5


def test_slo_names_what_a_point_breaks():
    v = SLO().violations(Point(1000, 900, 10, 80, 2))
    assert v == ["p99 80.0 ms > 50 ms", "2 errors", "achieved 900 < 98% of 1000 req/s"]


def test_additive_bound():
    assert additive_bound(1000, 1000) == 500 and additive_bound(3000, 10000) == pytest.approx(2307.7, abs=0.1)
    with pytest.raises(ValueError):
        additive_bound(0, 1)


# ---- smoke: a few seconds of open-loop load against a real TorchServe ------------------------------
@pytest.mark.slow
def test_open_loop_smoke_against_torchserve(digits_server):
    from loadtest.images import load_pool

    bodies = list(load_pool("digits", limit=16).images)
    r = run_open_loop(Target.post(f"{digits_server.url}/predictions/digits", bodies), 30, duration_s=3.0,
                      warmup_s=0.5, timeout_s=20)
    # Plumbing only (speed lives in bench/): every scheduled request (~90) answered 200, each latency
    # recorded in the histogram the percentiles come from.
    assert r.errors == 0 and r.ok == r.sent > 50, r
    assert r.p50_ms <= r.p99_ms <= r.max_ms and _waited_over(r, 0) == r.ok


def test_lockstep_takes_one_rate_per_system_per_round_and_finds_each_knee():
    from loadtest.capacity import search_lockstep

    order = []

    def system(name, knee):
        measure, _ = synthetic(knee)
        return (lambda rate: order.append(name) or measure(rate)), knee / 2

    res = search_lockstep({"a": system("a", 1000.0), "b": system("b", 300.0)}, SearchPlan(max_points=10))
    assert 1000 / 1.06 <= res["a"].capacity_rps <= 1000 and 300 / 1.06 <= res["b"].capacity_rps <= 300
    n = min(order.count("a"), order.count("b"))
    assert order[:2 * n] == ["a", "b"] * n  # alternating while both searches run


def test_bench_targets_are_ratios_of_capacities_and_a_peer_without_capacity_is_beaten():
    import importlib.util

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_capacity", REPO / "bench/bench_capacity.py")
    bench = sys.modules["bench_capacity"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(bench)
    t = bench.targets(300, 250, 100, 320, 40.0, SLO(p99_ms=50))
    assert t["vs_triton"] == pytest.approx(1.2) and t["vs_stock"] == 3.0 and t["vs_bound"] == pytest.approx(0.9375)
    assert t["vs_triton_ok"] and t["vs_stock_ok"] and t["vs_bound_ok"] and t["p99_ok"]
    t = bench.targets(100, 0, 0, 320, 60.0, SLO(p99_ms=50))
    assert t["vs_triton"] is None and t["vs_triton_ok"] and not t["vs_bound_ok"] and not t["p99_ok"]
    assert not bench.targets(0, 0, 0, 320, 0.0, SLO())["vs_triton_ok"]
